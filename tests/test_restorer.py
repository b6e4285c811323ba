import pytest
import torch

from pipeline.models.loading import load_restorer
from pipeline.models.restorer import PixelRestorer
from tests.conftest import smoke_params


def _model(**model_cfg):
    torch.manual_seed(0)
    return PixelRestorer.build(smoke_params(model=model_cfg).model)


def _batch(n=2, size=16):
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return gt, (gt + 0.2 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)


def test_untrained_residual_sample_model_returns_lq():
    """Zero output layer + x0 target on the residual: training starts exactly at the LQ."""
    model = _model()
    _, lq = _batch()
    with torch.no_grad():
        out = model.sample(lq, steps=4, eta=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.image, lq)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_sft_loss_trains_every_prediction_target(prediction_type):
    model = _model(prediction_type=prediction_type)
    gt, lq = _batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.sft_loss(gt, lq, torch.Generator().manual_seed(1)).mean()  # same noise each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_last_step_is_deterministic_and_trajectory_is_kept():
    model = _model()
    _, lq = _batch()
    with torch.no_grad():
        out = model.sample(lq, steps=5, eta=1.0, keep_trajectory=True)
    assert len(out.latents) == 6 and len(out.steps) == 5 and len(out.timesteps) == 5
    stds = [s.std for s in out.steps]
    assert all(s > 0 for s in stds[:-1]) and stds[-1] == 0.0
    assert out.timesteps[0] == 999  # trailing spacing starts from pure noise


def test_eta_zero_sampling_is_deterministic_given_noise_seed():
    model = _model(prediction_type="epsilon")
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    _, lq = _batch()
    with torch.no_grad():
        a = model.sample(lq, 4, 0.0, torch.Generator().manual_seed(3)).image
        b = model.sample(lq, 4, 0.0, torch.Generator().manual_seed(3)).image
        c = model.sample(lq, 4, 0.0, torch.Generator().manual_seed(4)).image
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_restore_is_the_mean_of_samples_from_successive_noise():
    model = _model(prediction_type="epsilon")
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    _, lq = _batch()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        draws = [model.sample(lq, 2, 0.0, g).image for _ in range(3)]
        mean = model.restore(lq, 2, 0.0, torch.Generator().manual_seed(5), samples=3)
        single = model.restore(lq, 2, 0.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(mean, torch.stack(draws).mean(dim=0))
    torch.testing.assert_close(single, draws[0])
    assert not torch.allclose(mean, draws[0])


def test_grad_flows_only_through_last_k_steps():
    model = _model()
    _, lq = _batch()
    out = model.sample(lq, steps=4, eta=1.0, keep_trajectory=True, grad_last_k=2)
    assert [s.mean.requires_grad for s in out.steps] == [False, False, True, True]
    out.image.mean().backward()
    assert model.unet.conv_out.weight.grad is not None


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt/unet/diffusion_pytorch_model.safetensors").exists()
    loaded = load_restorer(tmp_path / "ckpt")
    _, lq = _batch()
    with torch.no_grad():
        a = model.sample(lq, 3, 0.0, torch.Generator().manual_seed(0)).image
        b = loaded.sample(lq, 3, 0.0, torch.Generator().manual_seed(0)).image
    torch.testing.assert_close(a, b)


def test_from_pretrained_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a restorl checkpoint"):
        load_restorer(tmp_path)


def test_reference_is_a_frozen_copy():
    model = _model()
    ref = model.reference()
    assert not any(p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        model.unet.conv_out.bias.add_(1.0)
    assert not torch.equal(ref.unet.conv_out.bias, model.unet.conv_out.bias)


def test_task_conditioned_model_needs_known_task_names(tmp_path):
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, tasks=["jpeg", "gaussian_noise", "jpeg"])
    assert model.tasks == ["gaussian_noise", "jpeg"]
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    _, lq = _batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match="name the task"):
            model.sample(lq, 2)
        with pytest.raises(ValueError, match=r"\['rain'\] unknown to this restorer"):
            model.sample(lq, 2, tasks=["rain", "jpeg"])
        a = model.sample(lq, 2, generator=torch.Generator().manual_seed(0), tasks=["jpeg", "jpeg"]).image
        b = model.sample(lq, 2, generator=torch.Generator().manual_seed(0), tasks=["gaussian_noise"] * 2).image
    assert not torch.allclose(a, b), "the task label must change the restoration"
    model.save_pretrained(tmp_path / "ckpt")
    assert load_restorer(tmp_path / "ckpt").tasks == ["gaussian_noise", "jpeg"]


def test_task_conditioning_can_be_switched_off():
    model = PixelRestorer.build(smoke_params(model={"task_conditioning": False}).model, tasks=["jpeg"])
    assert model.tasks is None and model.unet.class_embedding is None


def test_task_balanced_weights_equalise_tasks():
    from pipeline.data.dataset import PairedSplit, sample_weights

    gt = torch.zeros(4, 3, 8, 8)
    lq = gt.clone()
    lq[:2] += 0.5  # a task with a large residual (low-light-like)
    lq[2:] += 0.05  # a mild one
    data = PairedSplit(gt, lq, [{"task": t} for t in ["big", "big", "mild", "mild"]])
    w = sample_weights("task_balanced", data)
    lq_error = ((gt - lq) ** 2).mean(dim=(1, 2, 3))
    # Weighted, both tasks contribute equally; the weights average to 1.
    torch.testing.assert_close((w * lq_error)[:2].sum(), (w * lq_error)[2:].sum(), rtol=1e-3, atol=0)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    assert torch.equal(sample_weights("mse", data), torch.ones(4))


def test_architecture_knobs_build_the_unet_they_name():
    model = _model(block_out_channels=[8, 16, 16], norm_groups=4, attention_levels=[1], attention_head_dim=4,
                   layers_per_block=2)
    unet = model.unet
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert unet.conv_norm_out.num_groups == 4 and len(unet.down_blocks[0].resnets) == 2
    gt, lq = _batch(2, 32)
    assert torch.isfinite(model.sft_loss(gt, lq).mean())
    with pytest.raises(Exception, match=r"block_out_channels \[6\]: every block needs .* divisible by norm_groups \(4\)"):
        smoke_params(model={"block_out_channels": [8, 6], "norm_groups": 4})
    with pytest.raises(Exception, match=r"attention_levels \[3\]: block indices run from 0 to 2"):
        smoke_params(model={"attention_levels": [3]})


def test_gradient_checkpointing_gives_the_same_gradients():
    from pipeline.models.loading import model_for_sft

    gt, lq = _batch(2, 32)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = smoke_params(model={"gradient_checkpointing": checkpointing, "attention_levels": [1]}).model
        model = model_for_sft(cfg, None, None, None).train()
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
        assert model.unet.is_gradient_checkpointing == checkpointing
        model.sft_loss(gt, lq, torch.Generator().manual_seed(1)).mean().backward()
        grads.append(model.unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
