"""The `score` and `rl` stages and their parts: step credit, loss mixing, the score table,
resume after a kill, evaluate's control rows, and clear errors for bad inputs."""

import csv
import json
import shutil

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipeline.config import ConfigError
from pipeline.data.dataset import load_split
from pipeline.data.sources import DataError
from pipeline.evaluate_record import format_table
from pipeline.models.restorer import PixelRestorer
from pipeline.models.reward_model import RewardModel
from pipeline.part_names import validate
from pipeline.paths import Paths
from pipeline.rl import loop
from pipeline.rl.advantages import group_advantages
from pipeline.rl.credit import STEP_CREDIT
from pipeline.rl.difficulty import WEIGHTINGS, DifficultyTracker, draw_images, mixed_loss
from pipeline.rl.difficulty_table import read_table
from pipeline.rl.parts import pick
from pipeline.rl.rollout import collect
from tests.conftest import BIN, kill_mid_run, run_tool, smoke_params, smoke_raw, stand_in_judge, write_params
from tests.test_storage import creds, make_bucket, moto_fixture, s3  # noqa: F401  (the moto S3 fixtures)

# ---------------------------------------------------------------------------------------------
# parts


class _Steps:
    def __init__(self, n):
        self.timesteps = list(range(n))


class _Checkpoints:
    reward_steps = [2, 4]


def test_multi_step_rewards_are_normalised_per_checkpoint_and_credited_to_earlier_steps():
    # Two groups of 3; checkpoint after 2 of 4 steps and the final image, on different scales.
    early = torch.tensor([[0.0, 1.0, 2.0], [5.0, 5.0, 5.0]])
    final = torch.tensor([[100.0, 300.0, 200.0], [1.0, 2.0, 3.0]])
    adv_k = torch.stack([group_advantages(r, clip=5.0).flatten() for r in (early, final)])
    for k in range(2):
        per_group = adv_k[k].view(2, 3)
        torch.testing.assert_close(per_group.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    # The scale of a checkpoint's reward does not matter, only its ranking within the group.
    torch.testing.assert_close(adv_k[1, :3], torch.tensor([-1.2247, 1.2247, 0.0]), atol=1e-4, rtol=0)
    assert torch.equal(adv_k[0, 3:], torch.zeros(3)), "a group without spread at a checkpoint gets no signal"

    per_step = STEP_CREDIT["next_checkpoint"](adv_k, _Steps(4), _Checkpoints())
    assert per_step.shape == (4, 6)
    # Steps 0 and 1 first show in the image predicted after 2 steps; steps 2 and 3 in the final one.
    for step, k in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert torch.equal(per_step[step], adv_k[k])
    terminal = STEP_CREDIT["terminal"](adv_k, _Steps(4), _Checkpoints())
    assert all(torch.equal(terminal[s], adv_k[1]) for s in range(4))


def test_checkpoint_rewards_score_the_predicted_image_at_each_checkpoint():
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, tasks=["a"])
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    lq = torch.rand(2, 3, 16, 16) * 2 - 1
    r = collect(model, lq, lq, ["a", "a"], group_size=2, steps=4, eta=1.0, generator=torch.Generator().manual_seed(0))
    def mean_pixel(images, gt=None):  # a stand-in reward
        return images.mean(dim=(1, 2, 3))

    rewards = loop.checkpoint_rewards(mean_pixel, r, [1, 3, 4])
    assert rewards.shape == (3, 4)
    torch.testing.assert_close(rewards[0], r.x0[1].clamp(-1, 1).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(rewards[1], r.x0[3].clamp(-1, 1).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(rewards[2], r.images.mean(dim=(1, 2, 3)))


def test_difficulty_weighting_moves_hard_samples_to_rl_and_easy_ones_to_sft():
    tracker = DifficultyTracker(torch.linspace(0, 1, 101))
    difficulties = torch.tensor([0.05, 0.5, 0.95])  # easy, middling, hard
    w = WEIGHTINGS["adaptive"].weights(tracker, difficulties, 0.3, 0.7)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 1.0]), atol=0.02, rtol=0)
    rl, sft = torch.tensor([10.0, 10.0, 10.0]), torch.tensor([1.0, 1.0, 1.0])
    loss = mixed_loss(w, rl, sft, lambda_sft=2.0)
    # easy: only lambda_sft * L_SFT; hard: only L_RL; in between: half of each.
    torch.testing.assert_close(loss, torch.tensor([2.0, 6.0, 10.0]), atol=0.25, rtol=0)
    # The ablation: the same mean weight for everyone, blind to difficulty.
    u = WEIGHTINGS["uniform"].weights(tracker, difficulties, 0.3, 0.7)
    assert torch.equal(u, torch.full((3,), 0.5))
    u = WEIGHTINGS["uniform"].weights(tracker, difficulties, 0.2, 0.4)
    torch.testing.assert_close(u, torch.full((3,), 0.7))


def test_oversampling_draws_hard_samples_more_often_and_never_twice():
    difficulties = torch.arange(20, dtype=torch.float)
    g = torch.Generator().manual_seed(0)
    counts = {name: torch.zeros(20) for name in ("uniform", "oversampled")}
    for _ in range(300):
        for name, share in (("uniform", 0.0), ("oversampled", 1.0)):
            picked = draw_images(difficulties, 5, share, g)
            assert len(set(picked.tolist())) == 5
            counts[name][picked] += 1
    assert counts["oversampled"][15:].sum() > 1.5 * counts["uniform"][15:].sum()
    with pytest.raises(ValueError, match="cannot draw 30 distinct samples from 20"):
        draw_images(difficulties, 30, 0.0, g)


def _rollouts():
    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, tasks=["a"])
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    lq = torch.rand(2, 3, 16, 16) * 2 - 1
    gt = (lq + 0.1).clamp(-1, 1)
    r = collect(model, lq, gt, ["a", "a"], group_size=2, steps=4, eta=1.0, generator=torch.Generator().manual_seed(0))
    return model, r


def _update(model, r, advantages, w, cfg, reference=None):
    """The update phase on the rollouts `r` with these advantages and one RL weight `w` for all."""
    samples = loop.EpochSamples(torch.arange(2), r, torch.zeros(1, 4), advantages, torch.full((4,), w),
                                torch.full((2,), w))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loop.train_on_rollouts(model, optimizer, samples, pick(cfg), cfg, torch.Generator().manual_seed(2), reference)


def _kl(model, reference, r, eta=1.0):
    """Mean KL between the model's and the reference's Gaussian steps over the stochastic steps."""
    from pipeline.rl.objectives import policy_step
    from pipeline.rl.policy import gaussian_kl

    idx = torch.arange(r.lq.shape[0])
    with torch.no_grad():
        return sum(float(gaussian_kl(policy_step(model, r, s, idx, eta).mean, policy_step(reference, r, s, idx, eta).mean,
                                     r.stds[s]).mean()) for s in r.mask.nonzero().flatten().tolist())


def test_kl_term_pulls_the_model_back_to_the_reference():
    """With zero advantages and no SFT term the loss is kl_beta * KL alone: the update moves a
    drifted model towards the frozen SFT model, never away from it."""
    import copy

    base, r = _rollouts()
    cfg = smoke_params(rl={"objective": "ppo", "steps": 4, "reward_steps": [4], "kl_beta": 100.0, "minibatch": 4,
                           "train_step_fraction": 1.0, "lr": 1e-4, "difficulty": {"weighting": "rl_only"}}).rl
    assert pick(cfg).needs_reference
    reference = base.reference()
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.unet.conv_out.weight.add_(0.05 * torch.randn(model.unet.conv_out.weight.shape,
                                                           generator=torch.Generator().manual_seed(3)))
    before = _kl(model, reference, r)
    assert before > 0
    _update(model, r, torch.zeros(4, 4), 1.0, cfg, reference)
    assert _kl(model, reference, r) < before


def test_a_non_finite_rl_loss_stops_the_update_before_the_step():
    import copy

    from pipeline.checkpoint import DivergedError

    base, r = _rollouts()
    cfg = smoke_params(rl={"objective": "ppo", "steps": 4, "reward_steps": [4], "minibatch": 4, "lr": 1e-3}).rl
    model = copy.deepcopy(base)
    with pytest.raises(DivergedError, match=r"rl: the loss is nan at the update of epoch 1"):
        _update(model, r, torch.full((4, 4), float("nan")), 1.0, cfg)
    for name, value in base.unet.state_dict().items():  # the step was not taken
        assert torch.equal(value, model.unet.state_dict()[name]), name


def test_each_rollout_gets_the_rl_weight_of_its_own_image():
    """The sampling phase repeats each image's weight over its G rollouts, in rollout order."""
    from pipeline.data.dataset import PairedSplit

    torch.manual_seed(0)
    model = PixelRestorer.build(smoke_params().model, tasks=["a"])
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.4, 0.8])[:, None, None, None]
    lq = (gt + noise * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    train = PairedSplit(gt, lq, [{"task": "a", "id": str(i)} for i in range(6)])
    pool = loop.Pool(train, torch.arange(6), torch.zeros(6))
    params = smoke_params(rl={"images_per_epoch": 4, "group_size": 3, "steps": 3, "reward_steps": [3],
                              "difficulty": {"q_lo": 0.0, "q_hi": 1.0}})

    def closeness(images, gt):  # a stand-in reward: the further from GT, the harder
        return -100 * (images - gt).abs().mean(dim=(1, 2, 3))

    tracker = DifficultyTracker(torch.linspace(0, 200, 201))
    samples = loop.sample_epoch(model, pool, closeness, tracker, pick(params.rl), params, g)
    w, per_image = samples.weights, samples.image_weights
    assert len(set(per_image.tolist())) > 1, "the test needs images of different weights"
    torch.testing.assert_close(w, per_image.repeat_interleave(3))
    for j in range(12):  # rollout j restores image picked[j // 3]
        assert torch.equal(samples.rollouts.lq[j], lq[pool.index[samples.picked[j // 3]]])


def test_selection_never_ships_an_epoch_that_lost_more_psnr_than_the_guard():
    base_model, _ = _rollouts()
    baseline = {"reward": -5.0, "psnr": 30.0}
    best = loop.Selection(0, 0.0, baseline, base_model.trainable_state())
    hacked = loop.select(best, 1, loop.Validation(-4.0, 29.5), baseline, 0.3, base_model)
    assert hacked is best, "a larger reward gain at -0.5 dB does not ship under a 0.3 dB guard"
    kept = loop.select(best, 2, loop.Validation(-4.5, 29.8), baseline, 0.3, base_model)
    assert (kept.epoch, kept.gain) == (2, 0.5)
    assert loop.select(kept, 3, loop.Validation(-4.8, 30.1), baseline, 0.3, base_model) is kept, "smaller gain"


def test_selection_refuses_an_epoch_that_buys_its_gain_with_one_tasks_fidelity():
    """Overall PSNR within the guard, low light 1 dB down (the reward brightening it): not shipped."""
    base_model, _ = _rollouts()
    baseline = {"reward": -5.0, "psnr": 30.0, "task_psnr": {"low_light": 24.0, "jpeg": 34.0}}
    best = loop.Selection(0, 0.0, baseline, base_model.trainable_state())
    drift = loop.Validation(-4.0, 29.9, {"low_light": 23.0, "jpeg": 34.2})
    assert loop.psnr_losses(drift, baseline) == pytest.approx({"overall": 0.1, "low_light": 1.0, "jpeg": -0.2})
    assert loop.select(best, 1, drift, baseline, 0.3, base_model) is best
    even = loop.Validation(-4.5, 29.9, {"low_light": 23.8, "jpeg": 34.0})
    assert loop.select(best, 2, even, baseline, 0.3, base_model).epoch == 2


def test_selection_refuses_a_reward_gain_the_held_out_judge_does_not_share():
    """PSNR within the guard everywhere, reward up, the judge down: a gain only the trained-on
    reward sees does not ship; with the judge up (or within the tolerance) it does."""
    base_model, _ = _rollouts()
    baseline = {"reward": -5.0, "psnr": 30.0, "task_psnr": {"jpeg": 34.0}, "judge": 10.0}
    best = loop.Selection(0, 0.0, baseline, base_model.trainable_state())
    hacked = loop.Validation(-4.0, 30.0, {"jpeg": 34.0}, judge=9.9)
    assert loop.judge_drop(hacked, baseline) == pytest.approx(0.1)
    assert loop.select(best, 1, hacked, baseline, 0.3, base_model, judge_guard=0.0) is best
    assert loop.select(best, 1, hacked, baseline, 0.3, base_model, judge_guard=0.2).epoch == 1
    assert loop.select(best, 1, hacked, baseline, 0.3, base_model, judge_guard=None).epoch == 1, "no judge check"
    shared = loop.Validation(-4.5, 30.0, {"jpeg": 34.0}, judge=10.3)
    assert loop.select(best, 2, shared, baseline, 0.3, base_model, judge_guard=0.0).epoch == 2
    with pytest.raises(ValueError, match="judge's val scores"):
        loop.select(best, 3, loop.Validation(-4.5, 30.0), baseline, 0.3, base_model, judge_guard=0.0)


@pytest.mark.parametrize("w, changed_term", [(0.0, "rl"), (1.0, "sft")])
def test_loss_weight_decides_which_term_moves_the_model(w, changed_term):
    """w = 0: the PPO term cannot matter (only SFT + KL train); w = 1: the SFT term cannot."""
    import copy

    base, r = _rollouts()
    cfg = smoke_params(rl={"objective": "ppo", "steps": 4, "reward_steps": [4], "kl_beta": 0.0, "minibatch": 4,
                           "train_step_fraction": 1.0, "lr": 1e-3}).rl
    advantages = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    runs = {}
    for variant in ("plain", "changed"):
        model = copy.deepcopy(base).train()
        adv = advantages if variant == "plain" or changed_term == "sft" else -advantages
        variant_cfg = cfg
        if variant == "changed" and changed_term == "sft":
            variant_cfg = cfg.model_copy(update={"difficulty": cfg.difficulty.model_copy(update={"lambda_sft": 50.0})})
        _update(model, r, adv, w, variant_cfg)
        runs[variant] = model.unet.state_dict()
    for name, value in runs["plain"].items():
        torch.testing.assert_close(value, runs["changed"][name], msg=name)
    assert not torch.equal(runs["plain"]["conv_out.weight"], base.unet.state_dict()["conv_out.weight"]), "it trained"


def test_with_both_terms_in_the_mix_the_advantage_sign_matters():
    """The control for the test above: at w = 0.5 flipping the advantages changes the update."""
    import copy

    base, r = _rollouts()
    cfg = smoke_params(rl={"objective": "ppo", "steps": 4, "reward_steps": [4], "kl_beta": 0.0, "minibatch": 4,
                           "train_step_fraction": 1.0, "lr": 1e-3}).rl
    advantages = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    weights = []
    for sign in (1, -1):
        model = copy.deepcopy(base).train()
        _update(model, r, sign * advantages, 0.5, cfg)
        weights.append(model.unet.state_dict()["conv_out.weight"])
    assert not torch.allclose(weights[0], weights[1])


def test_rl_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"rl: .*reward_steps \[3, 5\] must .* ending with steps=10"):
        validate(smoke_raw() | {"rl": {"reward_steps": [3, 5]}}, "x")
    with pytest.raises(ConfigError, match=r"rl\.step_credit: unknown 'gae'"):
        validate(smoke_raw() | {"rl": {"step_credit": "gae"}}, "x")
    with pytest.raises(ConfigError, match=r"rl\.difficulty\.weighting: unknown 'hardest'"):
        validate(smoke_raw() | {"rl": {"difficulty": {"weighting": "hardest"}}}, "x")
    with pytest.raises(ConfigError, match=r"rl\.difficulty: .*q_lo \(0.8\) must be below q_hi"):
        validate(smoke_raw() | {"rl": {"difficulty": {"q_lo": 0.8, "q_hi": 0.2}}}, "x")
    with pytest.raises(ConfigError, match=r"rl\.eta"):
        validate(smoke_raw() | {"rl": {"eta": 0.0}}, "x")


# ---------------------------------------------------------------------------------------------
# stages on the smoke workspace (tiny untrained models standing in for sft and reward)


@pytest.fixture
def models_ready(workspace, monkeypatch):
    """The prepared smoke workspace plus an SFT stand-in and a reward model, MLflow in SQLite."""
    paths = Paths(workspace)
    torch.manual_seed(0)
    train = load_split(paths.data, "train")
    model = PixelRestorer.build(smoke_params().model, train.tasks)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.02)
    model.save_pretrained(paths.sft_model)
    RewardModel(kernels=8, hidden=16).save(paths.reward_model)
    stand_in_judge(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    return workspace


def test_score_table_holds_rewards_fidelity_and_difficulty(models_ready):
    from pipeline.stages import score

    params = smoke_params()
    summary = score.run(params, models_ready)
    paths = Paths(models_ready)
    with open(paths.difficulty_table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == params.score.samples == summary["n"]
    train = load_split(paths.data, "train")
    for row in rows:
        i = int(row["index"])
        assert train.samples[i]["id"] == row["id"] and train.tasks[i] == row["task"]
        out, gt, ssim = float(row["reward_output"]), float(row["reward_gt"]), float(row["ssim"])
        assert float(row["reward_gap"]) == pytest.approx(gt - out, abs=1e-5)
        assert float(row["difficulty"]) == pytest.approx(gt - out + params.score.fidelity_weight * (1 - ssim), abs=1e-4)
        assert 0 < float(row["psnr"]) < 100
    assert len({r["index"] for r in rows}) == len(rows), "each sample scored once"
    assert (paths.plots / "difficulty_hist.png").read_bytes()[:4] == b"\x89PNG"
    index, difficulty = read_table(paths.difficulty_table, train)
    assert len(index) == len(rows) and torch.isfinite(difficulty).all()

    # A table for other data is refused, naming the file and the sample.
    text = paths.difficulty_table.read_text().replace(rows[0]["id"], "someone_else", 1)
    paths.difficulty_table.write_text(text)
    with pytest.raises(DataError, match=r"difficulty\.csv, line 2: sample 'someone_else' is not training patch"):
        read_table(paths.difficulty_table, train)


def test_rl_refuses_a_reward_that_failed_its_checks_unless_told(models_ready):
    """checkpoints/reward/checks.json says the reward misranks GT and LQ: rl stops before any
    work, naming the file and the failed rate; with rl.allow_failed_reward_checks it trains and
    tags the run."""
    import json

    from pipeline.rewards.scorers import RewardError
    from pipeline.stages import rl, score

    score.run(smoke_params(), models_ready)
    paths = Paths(models_ready)
    checks = {"gt_above_lq": 0.9, "gt_above_sft": 0.85, "mean": {"gt": 1.0, "sft": 0.0, "lq": -1.0},
              "hack_mean": {"dither": -0.5, "blur": -0.2}, "passed": False}
    (paths.reward_model / "checks.json").write_text(json.dumps(checks))
    with pytest.raises(RewardError, match=r"checkpoints/reward/checks\.json: the learned reward did not pass its held-out "
                                          r"checks \(gt_above_lq 0\.900 < 0\.95\)"):
        rl.run(smoke_params(rl={"allow_failed_reward_checks": False}), models_ready)
    assert not paths.rl_model.exists() and not (paths.metrics / "rl.json").exists()
    rl.run(smoke_params(rl={"allow_failed_reward_checks": True}), models_ready)
    run = MlflowClient().get_model_version_by_alias("restorer", "challenger").tags["restorl.run_id"]
    assert MlflowClient().get_run(run).data.tags["restorl.reward_checks_failed"] == "gt_above_lq 0.900 < 0.95"
    # Checks that pass let it through without a tag.
    (paths.reward_model / "checks.json").write_text(json.dumps(checks | {"gt_above_lq": 0.96, "passed": True}))
    rl.run(smoke_params(rl={"allow_failed_reward_checks": False}), models_ready)
    run = MlflowClient().get_model_version_by_alias("restorer", "challenger").tags["restorl.run_id"]
    assert "restorl.reward_checks_failed" not in MlflowClient().get_run(run).data.tags


def test_rl_stage_trains_registers_and_refuses_a_too_small_pool(models_ready):
    from pipeline.stages import rl, score

    score.run(smoke_params(), models_ready)
    summary = rl.run(smoke_params(), models_ready)
    paths = Paths(models_ready)
    assert (paths.rl_model / "unet/diffusion_pytorch_model.safetensors").exists()
    assert summary["rollouts"] == 8 and summary["registered"]["version"] == "1"
    client = MlflowClient()
    assert client.get_model_version_by_alias("restorer", "challenger").tags["restorl.stage"] == "rl"
    history = (paths.plots / "rl_curves.csv").read_text().splitlines()
    assert len(history) == 1 + 2 and "reward.step2.mean" in history[0] and "loss_rl" in history[0]
    # kl_pull compares the KL with the advantages: logged only for objectives that take advantages.
    assert ("kl_pull" in history[0]) == pick(smoke_params().rl).needs_advantages

    with pytest.raises(DataError, match=r"rl\.images_per_epoch=40 exceeds the 16 scored samples"):
        rl.run(smoke_params(rl={"images_per_epoch": 40}), models_ready)


def test_rl_scores_val_with_the_held_out_judge_and_needs_it_for_the_judge_guard(models_ready):
    """Each epoch's val judge score and its drop below SFT's are logged and in the summary; with
    rl.judge_guard set and no judge, one error naming the key and the missing file, nothing
    written; with judge_guard null the stage runs without it."""
    from pipeline.rewards.scorers import RewardError
    from pipeline.stages import rl, score

    score.run(smoke_params(), models_ready)
    paths = Paths(models_ready)
    summary = rl.run(smoke_params(), models_ready)
    with open(paths.plots / "rl_curves.csv", newline="") as f:
        history = list(csv.DictReader(f))
    run = MlflowClient().get_model_version_by_alias("restorer", "challenger").tags["restorl.run_id"]
    judged = MlflowClient().get_metric_history(run, "val_judge")
    assert [m.step for m in judged] == [0, 1, 2], "SFT's val judge score at step 0, then every epoch"
    sft_judge = judged[0].value
    for row, logged in zip(history, judged[1:]):
        assert float(row["val_judge"]) == pytest.approx(logged.value, rel=1e-5)
        assert float(row["val_judge_drop"]) == pytest.approx(sft_judge - logged.value, abs=1e-5)
    assert "val_judge_drop" in summary
    if summary["best_epoch"]:  # a shipped epoch never fell below SFT on the judge (judge_guard 0)
        assert summary["val_judge_drop"] <= 0

    shutil.rmtree(paths.judge_model)
    shutil.rmtree(paths.rl_model)
    (paths.metrics / "rl.json").unlink()
    with pytest.raises(RewardError, match=r"rl\.judge_guard is 0\.0 but there is no held-out judge at "
                                          r".*checkpoints/judge/model\.safetensors: run `restorl judge` first"):
        rl.run(smoke_params(), models_ready)
    assert not paths.rl_model.exists() and not (paths.metrics / "rl.json").exists()
    summary = rl.run(smoke_params(rl={"judge_guard": None}), models_ready)
    assert "val_judge_drop" not in summary
    assert "val_judge" not in (paths.plots / "rl_curves.csv").read_text().splitlines()[0]


def test_evaluate_reports_rl_and_hack_controls(models_ready):
    from pipeline.stages import evaluate

    shutil.copytree(Paths(models_ready).sft_model, Paths(models_ready).rl_model)
    metrics = evaluate.run(smoke_params(), models_ready)
    rows = ["lq", "sft", "rl", "sft_dither", "sft_unsharp", "sft_blur", "sft_contrast", "gt"]
    assert list(metrics["overall"]) == rows
    assert metrics["higher_is_better"]["reward"] is True
    for task, block in metrics["per_task"].items():
        assert set(rows) <= set(block), task
    # Same weights, same seed: RL equals SFT; the controls differ from it.
    assert metrics["overall"]["rl"] == metrics["overall"]["sft"]
    assert metrics["overall"]["sft_blur"]["psnr"] != metrics["overall"]["sft"]["psnr"]
    table = format_table(metrics)
    assert "sft_contrast" in table and "reward↑" in table
    # The perception-distortion picture: SFT and RL at `sampling` and at each frontier setting,
    # the controls at `sampling`; the points at `sampling` are the table's own figures.
    with open(models_ready / "plots/frontier.csv") as f:
        points = list(csv.DictReader(f))
    assert [(p["series"], p["steps"], p["samples"]) for p in points] == [
        ("sft", "3", "2"), ("rl", "3", "2"), ("sft_dither", "3", "2"), ("sft_unsharp", "3", "2"),
        ("sft_blur", "3", "2"), ("sft_contrast", "3", "2"), ("sft", "2", "1"), ("rl", "2", "1")]
    for p in points[:6]:
        overall = metrics["overall"][p["series"]]
        assert float(p["psnr"]) == pytest.approx(overall["psnr"], abs=1e-3)
        assert float(p["realism"]) == overall["realism"] and float(p["reward"]) == pytest.approx(overall["reward"], abs=1e-3)
    assert points[6]["psnr"] != points[0]["psnr"], "another sampler setting, another restoration"
    assert (models_ready / "plots/frontier.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# resume


def _rl_params(root, **sections):
    raw = smoke_raw()
    raw["rl"] |= {"epochs": 12}  # enough epochs that a kill lands mid-run
    write_params(root, raw | sections)


def _s3_step(moto) -> int:
    """The epoch of the rl resume state on S3 (0: none there)."""
    import io

    client = s3(moto)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="resume", Prefix="runs/rl/").get("Contents", [])]
    if not keys:
        return 0
    assert len(keys) == 1 and keys[0].endswith("/state.pt"), keys  # one fingerprint, one state
    body = client.get_object(Bucket="resume", Key=keys[0])["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=True)["step"]


def _rl_weights(root):
    return load_file(root / "checkpoints/rl/unet/diffusion_pytorch_model.safetensors")


@pytest.mark.e2e
def test_killed_rl_resumes_and_matches_uninterrupted_run(models_ready, tmp_path_factory, moto, creds):  # noqa: F811
    """Killed twice; the first time it resumes from the local state, the second time from the
    copy on S3 (storage.resume_uri, moto) after the local state is deleted, as on a new pod."""
    from pipeline.stages import score

    score.run(smoke_params(), models_ready)
    reference = tmp_path_factory.mktemp("rl_uninterrupted")
    for part in ("data", "checkpoints"):
        shutil.copytree(models_ready / part, reference / part)
    _rl_params(reference)
    run_tool([str(BIN / "restorl"), "rl"], reference)

    make_bucket(moto, "resume")
    _rl_params(models_ready, storage={"endpoint_url": creds, "resume_uri": "s3://resume/runs"})
    state = models_ready / "checkpoints/resume/rl/state.pt"
    first = kill_mid_run([str(BIN / "restorl"), "rl"], models_ready, state)
    # The second kill waits for the S3 copy (the upload follows the local write).
    second = kill_mid_run([str(BIN / "restorl"), "rl"], models_ready, lambda: _s3_step(moto), after_step=first)
    assert not (models_ready / "checkpoints/rl").exists(), "a killed run must not leave a final model"
    assert 0 < first < second < 12
    shutil.rmtree(models_ready / "checkpoints/resume")  # a new machine: only S3 has the state

    resumed = run_tool([str(BIN / "restorl"), "rl"], models_ready)
    assert "fetched from s3://resume/runs/rl/" in resumed.stdout and f"resuming from epoch {second}" in resumed.stdout
    assert not state.exists() and _s3_step(moto) == 0, "a finished run clears its resume state, here and on S3"
    # Exactly the same run (deterministic on the CPU): every epoch's figures, the last epoch's
    # record, the shipped (best) epoch and its weights.
    curves = [(root / "plots/rl_curves.csv").read_text() for root in (reference, models_ready)]
    assert curves[0] == curves[1], "same rewards, KL, weights and val figures every epoch"
    summaries = [json.loads((root / "metrics/rl.json").read_text()) for root in (reference, models_ready)]
    for summary in summaries:
        summary.pop("seconds")
        summary["registered"].pop("run_id")  # each run registers its own version
    assert summaries[0] == summaries[1] and summaries[0]["epochs"] == 12 and len(curves[0].splitlines()) == 1 + 12
    a, b = _rl_weights(reference), _rl_weights(models_ready)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
