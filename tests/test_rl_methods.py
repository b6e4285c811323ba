"""The seed methods as parts of the one RL loop: CoCA credit, LRPO's noise-level advantage and
GT likelihood, RFSR's wavelet LL loss, Gram term and reward feedback, the DDPO baseline, the
faces source; and one smoke run of the rl stage per method (profiles/methods/*.yaml)."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import PROFILES_DIR, ConfigError, deep_merge, load_raw, read_yaml
from pipeline.data.dataset import load_split
from pipeline.models.restorer import PixelRestorer
from pipeline.models.reward_model import RewardModel
from pipeline.part_names import validate
from pipeline.paths import Paths
from pipeline.rl.credit import STEP_WEIGHTING, coca_advantages, coca_step_weights, noise_level_scaled
from pipeline.rl.difficulty import DifficultyTracker, mixed_loss
from pipeline.rl.objectives import OBJECTIVES, UpdateBatch, refl_windows
from pipeline.rl.parts import pick
from pipeline.rl.regularizers import (
    REGULARIZERS,
    TrainedStep,
    gt_guided_mean,
    likelihood_penalty,
    wavelet_ll,
    wavelet_ll_l1,
)
from pipeline.rl.rollout import collect
from tests.conftest import REPO, scored_stand_ins, smoke_params, smoke_raw

METHODS = ("ddpo", "coca", "lrpo", "rfsr", "ppo", "uniform")
# ppo.yaml scores steps 5 and 10 of the default 10-step rollouts; smoke rollouts have 3 steps.
ON_SMOKE = {"ppo": {"rl": {"reward_steps": [2, 3]}}}


def method_raw(name: str, **overrides) -> dict:
    """The smoke profile with profiles/methods/<name>.yaml merged on top, then `overrides`."""
    method = deep_merge(read_yaml(PROFILES_DIR / "methods" / f"{name}.yaml"), ON_SMOKE.get(name, {}))
    return deep_merge(deep_merge(smoke_raw(), method), overrides)


def _rollouts(prediction_type: str = "sample", steps: int = 4):
    torch.manual_seed(0)
    model_cfg = smoke_params(model={"prediction_type": prediction_type}).model
    model = PixelRestorer.build(model_cfg, tasks=["a"])
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    lq = torch.rand(2, 3, 16, 16) * 2 - 1
    gt = (lq + 0.1).clamp(-1, 1)
    r = collect(model, lq, gt, ["a", "a"], group_size=2, steps=steps, eta=1.0,
                generator=torch.Generator().manual_seed(0))
    return model, r


# ---------------------------------------------------------------------------------------------
# CoCA


def _trajectory(x0: torch.Tensor, final: torch.Tensor, lq: torch.Tensor, stds: list[float]):
    """Just what a credit function reads from Rollouts."""
    return SimpleNamespace(x0=x0, images=final, lq=lq, timesteps=list(range(len(stds))), stds=stds,
                           mask=torch.tensor([1.0 if s > 0 else 0.0 for s in stds]))


def test_coca_weights_sum_to_one_and_follow_where_the_image_changed():
    torch.manual_seed(0)
    lq, final = torch.zeros(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    noise = torch.randn(3, 3, 8, 8)
    # Sample 0 approaches the final image evenly; sample 1 jumps at step 2; sample 2 is random.
    x0 = torch.stack([torch.stack([(k / 4) * final[0] + (1 - k / 4) * noise[0],
                                   final[1] if k >= 3 else noise[1],
                                   torch.randn(3, 8, 8)]) for k in range(4)])
    w = coca_step_weights(x0, final, window=1, lq=lq)
    assert w.shape == (4, 3) and (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=0), torch.ones(3))
    # Transition j shows in x0[j + 1]: the jump from x0[2] to x0[3] is transition 2's doing.
    assert w[2, 1] == pytest.approx(1.0)
    # Windows of 2 share their gain equally.
    w2 = coca_step_weights(x0, final, window=2, lq=lq)
    torch.testing.assert_close(w2.sum(dim=0), torch.ones(3))
    assert torch.equal(w2[0], w2[1]) and torch.equal(w2[2], w2[3])


def test_coca_gives_uniform_credit_when_x0_hat_never_changes():
    """Definition (coca_step_weights): no window gains -> all weight on the last step, so the
    reward-to-go is 1 everywhere and every step gets the trajectory's advantage, as in DDPO."""
    torch.manual_seed(0)
    lq = torch.rand(2, 3, 8, 8)
    final = torch.rand(2, 3, 8, 8)
    x0 = final[None].expand(5, -1, -1, -1, -1).clone()
    w = coca_step_weights(x0, final, window=2, lq=lq)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 1.0]]))

    stds = [0.5, 0.4, 0.3, 0.2, 0.0]
    adv = torch.tensor([[0.3, -2.0], [1.5, -0.7]])  # (K, N): only the final checkpoint counts
    per_step = coca_advantages(adv, _trajectory(x0, final, lq, stds), window=2, clip=5.0)
    torch.testing.assert_close(per_step[:4], adv[-1:].expand(4, -1))
    # x0-hat fixed until the deterministic last step: all weight there, and again equal advantages.
    x0_late = torch.rand(5, 2, 3, 8, 8)
    x0_late[:] = x0_late[0]
    per_step = coca_advantages(adv, _trajectory(x0_late, final, lq, stds), window=1, clip=5.0)
    torch.testing.assert_close(per_step[:4], adv[-1:].expand(4, -1))


def test_coca_advantages_are_reward_to_go_renormalised_and_clipped():
    torch.manual_seed(1)
    lq, final = torch.zeros(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    x0 = torch.stack([0.1 * final, 0.9 * final + 0.5 * torch.randn(1, 3, 8, 8), final, final])
    stds = [0.5, 0.3, 0.2, 0.0]
    r = _trajectory(x0, final, lq, stds)
    adv = torch.tensor([[2.0]])
    per_step = coca_advantages(adv, r, window=1, clip=10.0)
    # Reward-to-go never rises along the trajectory, and the stochastic steps' mean scale is 1.
    assert (per_step[1:] <= per_step[:-1] + 1e-6).all()
    torch.testing.assert_close(per_step[:3].mean(), torch.tensor(2.0))
    clipped = coca_advantages(adv, r, window=1, clip=2.1)
    assert clipped.max() == pytest.approx(2.1)


# ---------------------------------------------------------------------------------------------
# DDPO and LRPO's noise-level advantage


def test_ddpo_profile_is_terminal_reward_uniform_credit_and_pure_rl():
    cfg = validate(method_raw("ddpo"), "ddpo").rl
    assert cfg.reward_steps == [cfg.steps] and cfg.objective == "ppo" and cfg.kl_beta == 0
    assert cfg.step_credit == "terminal" and cfg.step_weighting == "uniform" and not cfg.regularizers
    parts = pick(cfg)
    assert parts.needs_advantages and not parts.needs_reference and not parts.uses_sft
    adv_k = torch.randn(1, 6)
    r = SimpleNamespace(timesteps=list(range(cfg.steps)))
    per_step = parts.step_weighting(parts.step_credit(adv_k, r, cfg), r, cfg)
    assert torch.equal(per_step, adv_k.expand(cfg.steps, -1))
    w = parts.weighting.weights(DifficultyTracker(torch.rand(10)), torch.rand(3), 0.3, 0.7)
    assert torch.equal(mixed_loss(w, torch.tensor([1.0, 2.0, 3.0]), torch.full((3,), 9.0), 1.0),
                       torch.tensor([1.0, 2.0, 3.0])), "no SFT term"


def test_noise_level_weights_scale_each_step_by_its_sigma_clipped():
    stds = [0.5, 0.3, 0.1, 0.0]  # mean over the stochastic ones: 0.3
    r = SimpleNamespace(stds=stds, mask=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    adv = torch.ones(4, 2)
    scaled = noise_level_scaled(adv, r, min_scale=0.5, max_scale=1.5)
    torch.testing.assert_close(scaled[:, 0], torch.tensor([1.5, 1.0, 0.5, 0.5]))
    loose = noise_level_scaled(-adv, r, min_scale=0.0, max_scale=10.0)
    torch.testing.assert_close(loose[:, 1], -torch.tensor([5 / 3, 1.0, 1 / 3, 0.0]))
    cfg = smoke_params(rl={"noise_level": {"min_scale": 0.5, "max_scale": 1.5}}).rl
    torch.testing.assert_close(STEP_WEIGHTING["noise_level"](adv, r, cfg), scaled)
    assert STEP_WEIGHTING["uniform"](adv, r, cfg) is adv


# ---------------------------------------------------------------------------------------------
# LRPO's GT likelihood


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_gt_guided_mean_is_the_policy_mean_when_the_model_predicts_the_gt(prediction_type):
    model, r = _rollouts(prediction_type)
    model.timesteps(4)
    for s in range(3):
        out = model.step(r.latents[s], r.timesteps[s], r.lq, 1.0, r.tasks)
        # Take the model's own x0-hat as the GT: the GT-guided step is then its own step.
        target = gt_guided_mean(model, r.latents[s], r.timesteps[s], out.x0, r.lq, 4, 1.0)
        torch.testing.assert_close(target, out.mean, atol=2e-4, rtol=1e-4)


def test_gt_likelihood_applies_to_the_last_steps_and_rewards_the_gt_step():
    model, r = _rollouts()
    cfg = smoke_params(rl={"steps": 4, "reward_steps": [4], "regularizers": ["gt_likelihood"],
                           "gt_likelihood": {"weight": 1.0, "last_steps": 1, "tau": 40.0}}).rl
    idx = torch.arange(4)
    model.timesteps(4)
    last_stochastic = int(r.mask.nonzero()[-1])
    term = REGULARIZERS["gt_likelihood"].loss
    for s in range(4):
        out = model.step(r.latents[s], r.timesteps[s], r.lq, 1.0, r.tasks)
        value = term(TrainedStep(r, s, idx, out, None), model, model, cfg)
        if s != last_stochastic:
            assert torch.equal(value, torch.zeros(4)), f"step {s} is not among the last steps"
    s = last_stochastic
    out = model.step(r.latents[s], r.timesteps[s], r.lq, 1.0, r.tasks)
    target = gt_guided_mean(model, r.latents[s], r.timesteps[s], r.gt, r.lq, 4, 1.0)
    at_gt = term(TrainedStep(r, s, idx, SimpleNamespace(mean=target), None), model, model, cfg)
    mean = out.mean.detach().clone().requires_grad_(True)
    off_gt = term(TrainedStep(r, s, idx, SimpleNamespace(mean=mean), None), model, model, cfg)
    assert (at_gt < off_gt).all(), "the policy whose mean is the GT step is penalised least"
    best = -torch.log(torch.tensor(r.stds[s])) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    torch.testing.assert_close(at_gt, likelihood_penalty(best, 40.0).expand(4))
    off_gt.sum().backward()
    assert mean.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# RFSR: wavelet LL loss, Gram term, reward feedback


def test_wavelet_ll_loss_is_zero_for_identical_images_blind_to_fine_detail_and_differentiable():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(wavelet_ll_l1(images, images.clone()), torch.zeros(2))
    assert wavelet_ll(images).shape == (2, 3, 8, 8) and wavelet_ll(images, "haar", 2).shape == (2, 3, 4, 4)
    # A zero-mean pattern inside every 2x2 block is pure detail: the Haar LL band ignores it.
    checker = 0.1 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(8, 8)
    torch.testing.assert_close(wavelet_ll_l1(images + checker, images), torch.zeros(2), atol=1e-6, rtol=0)
    moved = (images + 0.2).requires_grad_(True)
    loss = wavelet_ll_l1(moved, images)
    assert (loss > 0.1).all()
    loss.sum().backward()
    assert moved.grad is not None and moved.grad.abs().sum() > 0


def test_gram_term_is_zero_for_identical_models_and_grows_as_the_model_drifts():
    model, r = _rollouts()
    reference = model.reference()
    cfg = smoke_params(rl={"steps": 4, "reward_steps": [4], "regularizers": ["gram"],
                           "gram": {"weight": 1.0, "blocks": 2}}).rl
    idx, s = torch.arange(4), 1
    model.timesteps(4)
    reference.timesteps(4)

    def term(m):
        out = m.step(r.latents[s], r.timesteps[s], r.lq, 1.0, r.tasks)
        ref = reference.step(r.latents[s], r.timesteps[s], r.lq, 1.0, r.tasks)
        return REGULARIZERS["gram"].loss(TrainedStep(r, s, idx, out, ref), m, reference, cfg)

    assert torch.equal(term(model), torch.zeros(4))
    drifted = copy.deepcopy(model)
    with torch.no_grad():
        drifted.unet.conv_out.weight.add_(0.2 * torch.randn_like(drifted.unet.conv_out.weight))
    value = term(drifted)
    assert (value > 0).all()
    value.sum().backward()
    assert drifted.unet.conv_out.weight.grad.abs().sum() > 0, "the term trains the model"
    assert all(p.grad is None for p in reference.parameters()), "the reference stays frozen"


def test_refl_windows_match_rfsr_split():
    assert refl_windows(50, 0.4, 0.8) == (list(range(20)), list(range(40, 50)))
    assert refl_windows(3, 0.4, 0.8) == ([0], [2])
    assert refl_windows(10, 0.0, 0.95) == ([], [9])


def test_refl_objective_trains_through_the_reward_and_the_dwt_loss():
    model, r = _rollouts()

    def brightness(images, gt=None):  # a differentiable stand-in reward, always positive here
        return 10 + images.mean(dim=(1, 2, 3))

    def settings(**refl):
        return smoke_params(rl={"steps": 4, "reward_steps": [4], "objective": "refl",
                                "refl": {"reward_weight": 1.0, "dwt_weight": 1.0} | refl}).rl

    idx = torch.arange(4)
    refl = OBJECTIVES["refl"]
    assert refl.needs_differentiable_reward and not refl.needs_advantages

    def batch(cfg, seed, reward):
        return UpdateBatch(r, idx, cfg, torch.Generator().manual_seed(seed), reward=reward)

    # Only the last step is in a window: the loss is minus the reward of its x0-hat.
    model.timesteps(4)
    with torch.no_grad():
        last_x0 = model.step(r.latents[3], r.timesteps[3], r.lq, 1.0, r.tasks).x0
    for grad_steps in (1, 3):  # the chained steps stay on the recorded trajectory
        trained = copy.deepcopy(model)
        terms = refl.loss(trained, batch(settings(early_until=0.0, late_from=0.9, grad_steps=grad_steps), 0,
                                         brightness))
        torch.testing.assert_close(terms.rl, -brightness(last_x0))
        terms.rl.mean().backward()
        assert trained.unet.conv_out.weight.grad.abs().sum() > 0
    # Steps 0-2 early (wavelet LL loss >= 0), step 3 late (minus the reward, < 0): both get drawn.
    signs = set()
    for seed in range(12):
        terms = refl.loss(copy.deepcopy(model), batch(settings(early_until=0.75, late_from=0.75), seed, brightness))
        signs.add(bool((terms.rl >= 0).all()) - bool((terms.rl < 0).all()))
    assert signs == {1, -1}
    with pytest.raises(ValueError, match="differentiable reward"):
        refl.loss(model, batch(settings(), 0, None))


def test_composite_reward_with_a_full_reference_term_per_image_and_differentiable(tmp_path):
    from pipeline.rewards.scorers import build_reward, load_reward

    RewardModel(kernels=8, hidden=16).save(tmp_path / "checkpoints/reward")
    params = smoke_params(rl={"reward": {"learned": 1.0, "psnr": 0.1}})
    paths = Paths(tmp_path)
    plain = build_reward(params.rl.reward, torch.device("cpu"), learned_path=paths.reward_model)
    gt = torch.rand(3, 3, 32, 32) * 2 - 1
    images = (gt + 0.05 * torch.randn_like(gt)).clamp(-1, 1)
    assert plain(images, gt).shape == (3,)
    feedback = load_reward(params, paths, torch.device("cpu"), differentiable=True)
    x = images.clone().requires_grad_(True)
    values = feedback(x, gt)
    assert values.shape == (3,)
    torch.testing.assert_close(values.detach(), plain(images, gt), atol=1e-3, rtol=1e-4)
    values.sum().backward()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("rl, message", [
    ({"objective": "dpo"}, r"rl\.objective: unknown 'dpo'; known: \['ppo', 'refl'\]"),
    ({"step_weighting": "sigma"}, r"rl\.step_weighting: unknown 'sigma'"),
    ({"regularizers": ["lpips"]}, r"rl\.regularizers: unknown regularizer 'lpips'"),
    ({"regularizers": ["gram", "gram"]}, r"rl\.regularizers: lists a regularizer twice"),
    ({"refl": {"early_until": 0.9, "late_from": 0.5}}, r"rl\.refl: .*early_until \(0.9\) must not exceed"),
    ({"refl": {"wavelet": "wobble"}}, r"rl\.refl\.wavelet: 'wobble' is not a discrete wavelet"),
    ({"coca": {"windw": 2}}, r"rl\.coca\.windw: unknown key"),
    ({"noise_level": {"min_scale": 3.0}}, r"rl\.noise_level: .*min_scale \(3.0\) must not exceed"),
    ({"difficulty": {"weighting": "off"}}, r"rl\.difficulty\.weighting: unknown 'off'"),
])
def test_method_config_errors_name_the_key(rl, message):
    with pytest.raises(ConfigError, match=message):
        validate(deep_merge(smoke_raw(), {"rl": rl}), "x")


def test_defaults_keep_the_seed_method():
    cfg = smoke_params().rl
    assert (cfg.objective, cfg.step_credit, cfg.step_weighting, cfg.regularizers) == \
        ("refl", "next_checkpoint", "uniform", [])
    assert cfg.difficulty.weighting == "adaptive" and cfg.kl_beta == 0.0
    ppo = validate(deep_merge(load_raw(REPO / "params.yaml"), read_yaml(PROFILES_DIR / "methods/ppo.yaml")), "ppo").rl
    assert (ppo.objective, ppo.reward_steps, ppo.kl_beta, ppo.difficulty.weighting) == ("ppo", [5, 10], 50.0, "adaptive")
    for name in METHODS:
        validate(method_raw(name), name)  # every method file is valid on the smoke profile


# ---------------------------------------------------------------------------------------------
# faces


def test_faces_source_makes_one_patch_per_face(tmp_path):
    import json

    from pipeline.data.sources import load_faces
    from pipeline.stages import prepare

    faces = load_faces(5, 32)
    assert [f.name for f in faces] == [f"lfw_{i:03d}" for i in range(5)]
    assert all(f.gt.shape == (32, 32, 3) and f.gt.dtype.name == "uint8" for f in faces)
    assert all((f.gt[..., 0] == f.gt[..., 2]).all() for f in faces), "grey repeated to 3 channels"
    params = smoke_params(prepare={"source": {"kind": "faces", "face_count": 6},
                                   "split": {"val": [], "test": [], "val_fraction": 0.2, "test_fraction": 0.2},
                                   "patches_per_image": {"train": 2, "val": 1, "test": 1}})
    counts = prepare.run(params, tmp_path)
    assert counts == {"train": 8, "val": 1, "test": 1}
    manifest = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert manifest["source"] == "faces"
    assert load_split(tmp_path / "data/prepared", "train").gt.shape == (8, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"prepare\.source\.face_count"):
        validate(deep_merge(smoke_raw(), {"prepare": {"source": {"kind": "faces", "face_count": 101}}}), "x")


# ---------------------------------------------------------------------------------------------
# one rl run per method on the smoke workspace


@pytest.fixture(scope="module")
def scored_workspace(tmp_path_factory, prepared_smoke):
    """Smoke data, an SFT stand-in, a reward model and the score table, made once."""
    return scored_stand_ins(tmp_path_factory.mktemp("methods"), prepared_smoke)


@pytest.mark.e2e
@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_the_rl_stage(method, scored_workspace, tmp_path, monkeypatch):
    import csv

    from pipeline.stages import rl

    for part in ("data", "checkpoints"):
        shutil.copytree(scored_workspace / part, tmp_path / part)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = validate(method_raw(method), method)
    summary = rl.run(params, tmp_path)
    assert summary["rollouts"] == 2 * 2 * 2 and summary["registered"]["version"] == "1"
    assert (Paths(tmp_path).rl_model / "unet/diffusion_pytorch_model.safetensors").exists()
    with open(Paths(tmp_path).plots / "rl_curves.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert len(history) == 2
    for row in history:
        assert all(v not in ("nan", "inf", "-inf") for v in row.values()), row
        if params.rl.difficulty.weighting == "rl_only":
            assert float(row["loss_sft"]) == 0.0, "rl_only: no SFT term"
            assert float(row["weight_rl"]) == 1.0
        else:  # the seed method's mixing: some weight on each term
            assert float(row["loss_sft"]) > 0.0 and 0.0 < float(row["weight_rl"]) < 1.0
    if params.rl.regularizers:
        assert "loss_reg" in history[0]
    if method == "rfsr":
        # Before the first update trained and frozen model agree: no Gram penalty; after it, some.
        assert float(history[0]["loss_reg"]) == 0.0 < float(history[1]["loss_reg"])
    if method == "lrpo":
        assert all(float(row["loss_reg"]) != 0.0 for row in history), "the GT likelihood acts"
