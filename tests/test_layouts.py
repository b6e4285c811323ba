"""Pretrained layouts and LoRA, on tiny random-initialised diffusers folders loaded through
`model.pretrained` (the real loading code): each layout's sampling equals its diffusers
pipeline's own loop, reward feedback reaches the UNet through the decoder, adapters train alone,
switch off to the exact base, and export merged."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import ConfigError, LoraConfig
from pipeline.models import lora
from pipeline.models.loading import export, load_pretrained, load_restorer
from pipeline.models.restorer import PixelRestorer
from tests.conftest import smoke_params
from tests.tiny_models import save_ldm_sr, save_sd_upscale

LORA = {"rank": 2, "alpha": 2.0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    pixel = PixelRestorer.build(smoke_params().model, tasks=["a"])
    torch.nn.init.normal_(pixel.unet.conv_out.weight, std=0.05)  # not the zero init: outputs depend on weights
    pixel.save_pretrained(root / "pixel")
    return {"pixel": root / "pixel", "ldm_sr": save_ldm_sr(root / "ldm_sr"),
            "sd_upscale": save_sd_upscale(root / "sd_upscale")}


def pretrained(folder, tmp_path, **model):
    return load_pretrained(smoke_params(model={"pretrained": str(folder), **model}).model, None, tmp_path / "cache")


def images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def tasks_for(model, n):
    return ["a"] * n if model.tasks else None


@pytest.mark.parametrize("layout", ["pixel", "ldm_sr", "sd_upscale"])
def test_layout_is_read_from_the_folder(folders, tmp_path, layout):
    assert pretrained(folders[layout], tmp_path).layout == layout
    other = "pixel" if layout != "pixel" else "ldm_sr"
    with pytest.raises(ConfigError, match=f"model.layout is {other}, but .* holds a {layout} model"):
        pretrained(folders[layout], tmp_path, layout=other)


def test_a_folder_without_a_model_is_one_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is not a diffusers folder"):
        pretrained(tmp_path / "empty", tmp_path)
    with pytest.raises(ConfigError, match="model.pretrained: .*missing is not a folder"):
        pretrained(tmp_path / "missing", tmp_path)


def test_ldm_sr_sampling_equals_the_diffusers_pipeline(folders, tmp_path):
    """Same scheduler, same noise: restorl's DDIM loop over `step` gives the pipeline's image.
    The LQ is given at full size (the nearest upsampling of the pipeline's input), which the
    layout area-downsamples back to exactly the pipeline's input."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline

    model = pretrained(folders["ldm_sr"], tmp_path).eval()
    small = images(1, 16)
    lq = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    pipe = LDMSuperResolutionPipeline.from_pretrained(folders["ldm_sr"])
    pipe.scheduler = DDIMScheduler.from_config(model.sample_scheduler.config)
    for steps in (1, 2):
        expected = pipe(small, num_inference_steps=steps, eta=0.0, generator=torch.Generator().manual_seed(3),
                        output_type="pt").images * 2 - 1
        with torch.no_grad():
            ours = model.sample(lq, steps, 0.0, torch.Generator().manual_seed(3)).image
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sd_upscale_step_equals_the_diffusers_pipeline(folders, tmp_path):
    """One step and a two-step loop, from the same latents, with the pipeline's noise-augmented
    LQ (its first draw from a generator seeded 0) and the empty prompt."""
    from diffusers import DDIMScheduler, StableDiffusionUpscalePipeline

    model = pretrained(folders["sd_upscale"], tmp_path).eval()
    small01 = (images(1, 16) + 1) / 2
    lq = (small01 * 2 - 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    pipe = StableDiffusionUpscalePipeline.from_pretrained(folders["sd_upscale"])
    pipe.scheduler = DDIMScheduler.from_config(model.sample_scheduler.config)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    for steps in (1, 2):
        expected = pipe("", image=small01, num_inference_steps=steps, guidance_scale=1.0, noise_level=20,
                        latents=x_T, generator=torch.Generator().manual_seed(0), output_type="latent").images
        with torch.no_grad():
            x = x_T
            for t in model.timesteps(steps):
                x = model.step(x, t, lq, eta=0.0).mean
        torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["ldm_sr", "sd_upscale"])
def test_reward_feedback_reaches_the_unet_through_the_frozen_decoder(folders, tmp_path, layout):
    model = pretrained(folders[layout], tmp_path).train()
    lq = images(2)
    model.timesteps(4)
    x_t = torch.randn(model.noise_shape(lq), generator=torch.Generator().manual_seed(0))
    out = model.step(x_t, model.timesteps(4)[1], lq, eta=1.0)
    assert out.x0.shape == lq.shape  # x0-hat is a decoded image, at the GT's size
    out.x0.square().mean().backward()  # a stand-in for -reward(x0-hat)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [model.unet.conv_in.weight])
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert model.trainable_parameters() == [p for p in model.unet.parameters()]


@pytest.mark.parametrize("layout", ["ldm_sr", "sd_upscale"])
def test_latent_sft_loss_trains_the_unet(folders, tmp_path, layout):
    model = pretrained(folders[layout], tmp_path).train()
    gt = images(4, seed=1)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model.sft_loss(gt, gt, torch.Generator().manual_seed(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _train_adapters(model, steps=5):
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    gt = images(2, seed=2)
    for _ in range(steps):
        loss = model.sft_loss(gt, gt, torch.Generator().manual_seed(1), tasks=tasks_for(model, 2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("layout", ["pixel", "ldm_sr", "sd_upscale"])
def test_lora_trains_adapters_only_and_switched_off_is_the_base(folders, tmp_path, layout):
    model = pretrained(folders[layout], tmp_path)
    lq = images(2)
    x_t = torch.randn(model.noise_shape(lq), generator=torch.Generator().manual_seed(0))
    t = model.timesteps(4)[1]
    with torch.no_grad():
        base = model.step(x_t, t, lq, 1.0, tasks_for(model, 2))
    base_weights = {k: v.clone() for k, v in model.unet.state_dict().items()}
    lora.attach(model, LoraConfig(**LORA), "sft")
    trained = model.trainable_parameters()
    assert trained and all(".sft." in n for n, p in model.unet.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in trained) < 0.5 * sum(p.numel() for p in base_weights.values())
    _train_adapters(model)
    reference = model.reference()
    assert isinstance(reference, lora.AdaptersOff)  # no copy of the base
    with torch.no_grad():
        adapted = model.step(x_t, t, lq, 1.0, tasks_for(model, 2))
        switched_off = reference.step(x_t, t, lq, 1.0, tasks_for(model, 2))
    assert not torch.allclose(adapted.mean, base.mean)
    # Switched off, the adapted network is the base exactly: its weights never moved.
    assert torch.equal(switched_off.mean, base.mean) and torch.equal(switched_off.x0, base.x0)


@pytest.mark.parametrize("layout", ["pixel", "ldm_sr", "sd_upscale"])
def test_adapter_checkpoint_points_at_its_base_and_exports_merged(folders, tmp_path, layout):
    model = pretrained(folders[layout], tmp_path)
    lora.attach(model, LoraConfig(**LORA), "sft")
    _train_adapters(model)
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt/restorl.json").read_text())
    assert meta["base"]["uri"] == str(folders[layout]) and len(meta["base"]["hash"]) == 16
    assert [a["name"] for a in meta["adapters"]] == ["sft"]
    assert not (tmp_path / "ckpt/unet").exists()  # adapters only, not a copy of the base

    lq = images(2)
    x_t = torch.randn(model.noise_shape(lq), generator=torch.Generator().manual_seed(0))
    t = model.timesteps(4)[1]
    with torch.no_grad():
        adapted = model.step(x_t, t, lq, 1.0, tasks_for(model, 2))
        loaded = load_restorer(tmp_path / "ckpt")
        loaded.timesteps(4)
        from_checkpoint = loaded.step(x_t, t, lq, 1.0, tasks_for(model, 2))
        export(tmp_path / "ckpt", tmp_path / "merged")
        merged = load_restorer(tmp_path / "merged")
        merged.timesteps(4)
        from_export = merged.step(x_t, t, lq, 1.0, tasks_for(model, 2))
    torch.testing.assert_close(from_checkpoint.mean, adapted.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(from_export.mean, adapted.mean, atol=1e-5, rtol=1e-4)
    assert not merged.adapters and (tmp_path / "merged/unet/config.json").exists()
    if layout != "pixel":  # a plain pipeline folder: the diffusers pipeline class loads it
        from diffusers import DiffusionPipeline

        assert type(DiffusionPipeline.from_pretrained(tmp_path / "merged")).__name__ == json.loads(
            (folders[layout] / "model_index.json").read_text())["_class_name"]


def test_rl_adapter_stacks_on_the_merged_sft_adapter(folders, tmp_path):
    """RL's reference (RL's adapter off) is exactly the SFT model; its checkpoint keeps both adapters."""
    from pipeline.models.loading import model_for_rl

    cfg = smoke_params(model={"pretrained": str(folders["ldm_sr"]), "lora": LORA}).model
    model = pretrained(folders["ldm_sr"], tmp_path)
    lora.attach(model, cfg.lora, "sft")
    _train_adapters(model)
    model.save_pretrained(tmp_path / "sft")
    rl = model_for_rl(tmp_path / "sft", cfg, None, tmp_path / "cache")
    sft = load_restorer(tmp_path / "sft")
    sft.timesteps(4)
    lq = images(2)
    x_t = torch.randn(rl.noise_shape(lq), generator=torch.Generator().manual_seed(0))
    t = rl.timesteps(4)[1]
    _train_adapters(rl)
    with torch.no_grad():
        torch.testing.assert_close(rl.reference().step(x_t, t, lq, 1.0).mean, sft.step(x_t, t, lq, 1.0).mean)
        ours = rl.step(x_t, t, lq, 1.0).mean
    rl.save_pretrained(tmp_path / "rl")
    assert [a["name"] for a in json.loads((tmp_path / "rl/restorl.json").read_text())["adapters"]] == ["sft", "rl"]
    with torch.no_grad():
        loaded = load_restorer(tmp_path / "rl")
        loaded.timesteps(4)
        torch.testing.assert_close(loaded.step(x_t, t, lq, 1.0).mean, ours, atol=1e-5, rtol=1e-4)


def test_a_changed_base_is_one_error_naming_it(folders, tmp_path):
    import shutil

    base = shutil.copytree(folders["pixel"], tmp_path / "base")
    model = pretrained(base, tmp_path)
    lora.attach(model, LoraConfig(**LORA), "sft")
    model.save_pretrained(tmp_path / "ckpt")
    (base / "unet/config.json").write_text((base / "unet/config.json").read_text() + " ")
    with pytest.raises(ConfigError, match=f"trained on {base} with hash .*, which now has hash"):
        load_restorer(tmp_path / "ckpt")


def test_target_modules_that_match_nothing_name_the_key(folders, tmp_path):
    model = pretrained(folders["pixel"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.lora.target_modules \['nothing_here'\]"):
        lora.attach(model, LoraConfig(rank=2, alpha=2.0, target_modules=["nothing_here"]), "sft")


def test_a_base_conditioned_on_other_tasks_is_one_error_naming_it(folders):
    from pipeline.models.loading import model_for_sft

    cfg = smoke_params(model={"pretrained": str(folders["pixel"])}).model
    with pytest.raises(ConfigError, match=r"model.pretrained: .* is conditioned on the tasks \['a'\]; the prepared "
                                          r"data also has \['jpeg'\]"):
        model_for_sft(cfg, ["a", "jpeg"], None, folders["pixel"].parent / "cache")


def test_latent_patch_sides_must_divide_by_the_autoencoder_factor(folders, tmp_path):
    model = pretrained(folders["ldm_sr"], tmp_path)
    with pytest.raises(ConfigError, match="prepare.patch_size: the ldm_sr layout needs image sides that are "
                                          "multiples of 2"):
        model.sample(images(1, 31), 2)
