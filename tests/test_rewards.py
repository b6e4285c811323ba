"""Reward scorers: orientation, composites, NaN guard, hack controls, the learned model's io."""

import pytest
import torch

from pipeline.models.reward_model import RewardModel
from pipeline.rewards.hacks import HACKS
from pipeline.rewards.iqa import MetricError
from pipeline.rewards.scorers import Reward, RewardError, Scorer, Term, build_reward


def _images(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return gt, (gt + 0.3 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)


def test_fr_and_nr_pyiqa_terms_are_oriented_higher_is_better():
    gt, noisy = _images()
    reward = build_reward({"psnr": 1.0}, torch.device("cpu"))
    assert (reward(gt, gt) > reward(noisy, gt)).all()
    with pytest.raises(RewardError, match="'psnr' is full-reference and needs the GT"):
        reward(noisy)
    piqe = build_reward({"piqe": 1.0}, torch.device("cpu"))
    # PIQE is lower-is-better; the reward negates it.
    assert torch.allclose(piqe(noisy), -piqe.terms[0].scorer.metric(((noisy + 1) / 2)).reshape(-1).float())


def test_composite_is_the_weighted_sum():
    gt, noisy = _images()
    both = build_reward({"psnr": 0.5, "ssim": 2.0}, torch.device("cpu"))
    a = build_reward({"psnr": 1.0}, torch.device("cpu"))(noisy, gt)
    b = build_reward({"ssim": 1.0}, torch.device("cpu"))(noisy, gt)
    torch.testing.assert_close(both(noisy, gt), 0.5 * a + 2.0 * b)


class _Broken(Scorer):
    name, needs_reference, differentiable = "broken", False, False

    def __call__(self, images, reference=None):
        out = torch.zeros(images.shape[0])
        out[1] = float("nan")
        return out


def test_nan_reward_is_an_error_not_a_zero():
    with pytest.raises(RewardError, match="'broken' returned NaN/inf for 1 image"):
        Reward([Term("broken", 1.0, _Broken())])(_images()[0])


def test_unknown_metric_and_missing_learned_model_are_named(tmp_path):
    with pytest.raises(MetricError, match="'no_such_metric'"):
        build_reward({"no_such_metric": 1.0}, torch.device("cpu"))
    with pytest.raises(RewardError, match=f"reward model at {tmp_path}/reward"):
        build_reward({"learned": 1.0}, torch.device("cpu"), learned_path=tmp_path / "reward")


def test_learned_reward_model_round_trip_and_gradient(tmp_path):
    torch.manual_seed(0)
    model = RewardModel(kernels=8, hidden=16).eval()
    model.save(tmp_path / "reward")
    reward = build_reward({"learned": 1.0}, torch.device("cpu"), learned_path=tmp_path / "reward")
    gt, _ = _images()
    torch.testing.assert_close(reward(gt), model(gt))
    x = gt.clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "reward feedback needs a gradient"


def test_quantized_input_ignores_sub_grey_level_changes():
    torch.manual_seed(0)
    model = RewardModel(kernels=8, hidden=16).eval()
    x = (torch.randint(0, 256, (2, 3, 32, 32)).float() / 255) * 2 - 1
    torch.testing.assert_close(model(x), model(x + 0.2 / 255))


def test_score_is_the_same_for_every_orientation_of_an_image():
    torch.manual_seed(0)
    model = RewardModel(kernels=8, hidden=16).eval()
    x, _ = _images()
    turned = torch.rot90(x, 1, (2, 3)).flip(3)
    torch.testing.assert_close(model(turned), model(x))
    # one view alone is not invariant: the mean over views is what makes it so
    assert not torch.allclose(model.score_view(turned), model.score_view(x))


@pytest.mark.parametrize("name", sorted(HACKS))
def test_hack_controls_change_the_image_slightly(name):
    gt, _ = _images()
    out = HACKS[name](gt, torch.Generator().manual_seed(0))
    assert out.shape == gt.shape and out.min() >= -1 and out.max() <= 1
    diff = (out - gt).abs().mean()
    assert 0 < diff < 0.5


def test_training_batch_pairs_put_the_better_image_first():
    from pipeline.rewards.training import training_batch

    gt, lq = _images(n=4)
    restored = gt.clone()
    restored[:2] = lq[:2] + 0.5  # two restorations worse than their LQ, two perfect
    fresh = [lq.flip(2), lq.flip(3)]
    images, quality, hacks = training_batch(gt, lq, restored.clamp(-1, 1), fresh, torch.Generator().manual_seed(0))
    assert images.shape == ((3 + len(fresh) + len(HACKS)) * 4, 3, 32, 32)
    assert len(quality) == 4 + 4 + 2 + 4 * len(fresh)  # SFT≻LQ only where SFT is closer
    assert len(hacks) == 4 * len(HACKS)
    # Pairs follow quality: under the same transform, the better image is closer to the GT.
    d = ((images - images[:4].repeat(len(images) // 4, 1, 1, 1)) ** 2).mean(dim=(1, 2, 3))
    assert (d[quality[:, 0]] <= d[quality[:, 1]]).all()  # equal only for the two perfect restorations
    assert (quality[:, 0] % 4 == quality[:, 1] % 4).all() and (hacks[:, 0] % 4 == hacks[:, 1] % 4).all()
    assert set((hacks[:, 0] // 4).tolist()) == {2}  # hack pairs: the SFT output over its hacked copies


def test_detail_pairs_rank_the_fine_part_of_the_sft_error_below_gt():
    """GT over GT plus the high-pass of SFT's error, SFT less it over SFT: the worse image of
    each pair carries the error's fine part, the better one does not, and the brightness
    (low-pass) of each pair's images is the same."""
    from pipeline.models.reward_model import high_pass
    from pipeline.rewards.training import training_batch

    gt, lq = _images(n=4)
    g = torch.Generator().manual_seed(1)
    restored = (gt - high_pass(gt) + 0.1 + 0.05 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    fresh = [lq.flip(2)]
    plain = training_batch(gt, lq, restored, fresh, torch.Generator().manual_seed(0))
    images, quality, hacks, detail = training_batch(gt, lq, restored, fresh, torch.Generator().manual_seed(0),
                                                    detail=True)
    kinds = 3 + len(fresh) + len(HACKS)
    assert images.shape[0] == (kinds + 2) * 4 and len(plain) == 3
    torch.testing.assert_close(images[:kinds * 4], plain[0])  # the other kinds are untouched
    assert torch.equal(quality, plain[1]) and torch.equal(hacks, plain[2])
    assert sorted(set((detail // 4).flatten().tolist())) == [0, 2, kinds, kinds + 1]
    assert (detail[:, 0] % 4 == detail[:, 1] % 4).all()
    gt_t, sft_t = images[:4].repeat(len(images) // 4, 1, 1, 1), images[8:12].repeat(len(images) // 4, 1, 1, 1)
    fine_error = high_pass(images - gt_t).pow(2).mean(dim=(1, 2, 3))
    assert (fine_error[detail[:, 0]] < 0.2 * fine_error[detail[:, 1]]).all()
    brightness = (images - sft_t).mean(dim=(1, 2, 3))  # SFT is 0.1 brighter than GT
    assert brightness[detail[:, 0]].sub(brightness[detail[:, 1]]).abs().max() < 0.02


def test_training_with_the_detail_weight_learns_the_detail_pairs(tmp_path, monkeypatch):
    """From the same start and batches, a reward trained with detail pairs ranks GT above GT plus
    SFT's fine error by a wider margin than one trained without them."""
    import mlflow

    from pipeline.config import RewardConfig
    from pipeline.data.dataset import PairedSplit
    from pipeline.models.reward_model import high_pass
    from pipeline.rewards.training import train_reward_model

    gt, lq = _images(n=16, seed=2)
    g = torch.Generator().manual_seed(3)
    sft = (gt - 0.5 * high_pass(gt) + 0.15 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    split = PairedSplit(gt, lq, [{"task": "gaussian_noise"}] * 16)
    noisy_gt = (gt + high_pass(sft - gt)).clamp(-1, 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    margins = []
    for weight in (0.0, 4.0):
        cfg = RewardConfig(steps=30, batch_size=8, kernels=4, hidden=8, lr=0.01, detail_weight=weight)
        torch.manual_seed(0)
        with mlflow.start_run():  # the loop logs its losses to the active run
            model = train_reward_model(cfg, split, sft, [], torch.Generator().manual_seed(0), torch.device("cpu"),
                                       8, "reward", tmp_path / "resume")
        with torch.no_grad():
            margins.append(float((model(gt) - model(noisy_gt)).mean()))
    assert margins[1] > margins[0] + 0.5, margins


def test_fresh_degradations_are_8_bit_and_differ_from_gt():
    import numpy as np

    from pipeline.rewards.training import fresh_degradations

    gt, _ = _images(n=3)
    gt = ((gt + 1) * 127.5).round() / 127.5 - 1
    out = fresh_degradations(gt, np.random.default_rng(0))
    assert out.shape == gt.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, ((out + 1) * 127.5).round() / 127.5 - 1)
    assert ((out - gt).abs().mean(dim=(1, 2, 3)) > 0).all()


def test_reward_stage_trains_and_reports_checks(workspace):
    """The reward stage on the smoke profile: model, every check figure in its folder's
    checks.json, the headline in metrics/reward.json."""
    import json

    from pipeline.stages import reward, sft
    from tests.conftest import smoke_params

    params = smoke_params()
    sft.run(params, workspace)
    checks = reward.run(params, workspace)
    saved = json.loads((workspace / "checkpoints/reward/checks.json").read_text())
    assert saved == checks
    assert set(saved["hack_mean"]) == set(HACKS)
    assert 0 <= saved["gt_above_lq"] <= 1 and isinstance(saved["passed"], bool)
    above = sum(v > checks["mean"]["sft"] for v in checks["hack_mean"].values())
    assert json.loads((workspace / "metrics/reward.json").read_text()) == {
        "gt_above_lq": checks["gt_above_lq"], "gt_above_sft": checks["gt_above_sft"],
        "hacks_above_sft": above, "passed": checks["passed"]}
    assert RewardModel.load(workspace / "checkpoints/reward")(torch.zeros(1, 3, 32, 32)).shape == (1,)

    # A diverging run (a learning rate far too high) stops at its first non-finite loss and
    # leaves the model it replaced alone.
    from pipeline.checkpoint import DivergedError

    before = (workspace / "checkpoints/reward/model.safetensors").read_bytes()
    with pytest.raises(DivergedError, match=r"reward: the loss is (nan|inf) at step \d+; nothing was saved"):
        reward.run(smoke_params(reward={"lr": 1e30}), workspace)
    assert (workspace / "checkpoints/reward/model.safetensors").read_bytes() == before


def test_reward_weights_that_do_not_fit_the_model_name_the_folder(tmp_path):
    import json

    RewardModel(kernels=8, hidden=16).save(tmp_path / "reward")
    config = tmp_path / "reward" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"kernels": 12}))
    with pytest.raises(ValueError, match=r"reward: weights do not fit this reward model.*run the reward stage again"):
        RewardModel.load(tmp_path / "reward")


class _Smoothness(torch.nn.Module):
    """A stand-in scorer (no training needed): minus the high-frequency energy, times `sign`."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pipeline.models.reward_model import high_pass

        return -self.sign * high_pass(x).pow(2).mean(dim=(1, 2, 3))


def test_reward_checks_rank_rates_and_catch_a_hack_that_beats_the_sft_output():
    from pipeline.data.dataset import PairedSplit
    from pipeline.rewards.training import reward_checks

    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-0.5, 0.5, 32)
    gt = (ramp[None, None, :, None] + ramp[None, None, None, :] * torch.rand(6, 3, 1, 1, generator=g)) / 2
    lq = gt + 0.2 * torch.randn(gt.shape, generator=g)
    sft = gt + 0.05 * torch.randn(gt.shape, generator=g)
    val = PairedSplit(gt, lq, [{"task": "gaussian_noise"}] * 6)
    checks = reward_checks(_Smoothness(), val, sft, g)
    assert checks["gt_above_lq"] == 1.0 and checks["gt_above_sft"] == 1.0
    # a smoothness score prefers the 3x3 blur of the noisy SFT output to the output itself
    assert checks["hack_mean"]["blur"] > checks["mean"]["sft"] and checks["passed"] is False
    assert checks["hack_mean"]["dither"] < checks["mean"]["sft"]
    inverted = reward_checks(_Smoothness(sign=-1.0), val, sft, g)
    assert inverted["gt_above_lq"] == 0.0 and inverted["passed"] is False


def test_reward_checks_refuse_rates_below_their_thresholds():
    """GT above LQ for 5 of 6 patches (0.83 < 0.95) fails the checks even with every hack below
    SFT; all six passes. A score that is the negative distance to the GT ranks exactly."""
    from pipeline.data.dataset import PairedSplit
    from pipeline.rewards.training import reward_checks

    g = torch.Generator().manual_seed(0)
    gt = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    lq = gt + 0.2 * torch.randn(gt.shape, generator=g)
    sft = gt + 0.01 * torch.randn(gt.shape, generator=g)
    val = PairedSplit(gt, lq, [{"task": "gaussian_noise"}] * 6)

    class Closeness(torch.nn.Module):
        def __init__(self, fooled: int | None = None):
            super().__init__()
            self.fooled = fooled

        def forward(self, x):
            score = -((x - gt) ** 2).mean(dim=(1, 2, 3))
            if self.fooled is not None and torch.equal(x, gt):
                score = score.clone()
                score[self.fooled] = -10.0  # this GT scores below everything
            return score

    good = reward_checks(Closeness(), val, sft, g)
    assert good["gt_above_lq"] == 1.0 and good["passed"] is True
    fooled = reward_checks(Closeness(fooled=0), val, sft, g)
    assert fooled["gt_above_lq"] == pytest.approx(5 / 6) and fooled["passed"] is False


def test_dither_control_is_one_grey_level():
    """The dither control adds noise of sigma 1/255 in [0, 1] units (2/255 in [-1, 1])."""
    x = torch.zeros(4, 3, 64, 64)
    out = HACKS["dither"](x, torch.Generator().manual_seed(0))
    assert (out - x).std().item() == pytest.approx(2 / 255, rel=0.05)


def test_reward_check_failures_name_each_failed_check():
    from pipeline.rewards.checks import failures

    ok = {"gt_above_lq": 0.96, "gt_above_sft": 0.8, "mean": {"sft": -1.0}, "hack_mean": {"blur": -2.0}}
    assert failures(ok) == []
    bad = ok | {"gt_above_sft": 0.75, "hack_mean": {"blur": -2.0, "unsharp": -0.5}}
    assert failures(bad) == ["gt_above_sft 0.750 < 0.8", "hack unsharp -0.5 above the SFT output's -1"]


def test_the_metrics_headline_counts_the_hack_controls_above_sft():
    from pipeline.rewards.checks import headline

    checks = {"gt_above_lq": 0.9, "gt_above_sft": 0.8, "mean": {"gt": 1.0, "sft": -1.0, "lq": -3.0},
              "hack_mean": {"blur": -2.0, "unsharp": -0.5, "dither": -0.9}, "passed": False}
    assert headline(checks) == {"gt_above_lq": 0.9, "gt_above_sft": 0.8, "hacks_above_sft": 2, "passed": False}
    assert headline(checks | {"hack_mean": {"blur": -1.0}})["hacks_above_sft"] == 0  # a tie is not above

