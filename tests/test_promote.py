"""`restorl promote`: the rl stage's registered version vs champion on the same test split,
judged by the learned reward and full-reference guards, decisions recorded, idempotent.

Models are real registered pyfunc versions of `restorer`. Their quality is set by
construction, not by training (too slow here): a freshly built restorer has a zero output
layer, so it returns the LQ input exactly ("identity"); random weights in that layer
add structured noise ("noisy", `std` sets how much), which costs PSNR and SSIM. The learned
reward is a randomly initialised reward model of the real class in checkpoints/reward.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.checkpoint import file_hash
from pipeline.data.dataset import load_split
from pipeline.model_registry import register_restorer
from pipeline.models.restorer import PixelRestorer
from pipeline.models.reward_model import RewardModel
from pipeline.paths import Paths
from pipeline.rewards import iqa
from pipeline.stages import promote as promote_stage
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, stand_in_judge, write_params

NAME = "restorer"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An initialised, empty SQLite store: creating its tables takes seconds, copying it none."""
    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(workspace, empty_db, monkeypatch):
    """The prepared smoke workspace with its own SQLite MLflow store and a reward model."""
    shutil.copy(empty_db, workspace / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    monkeypatch.chdir(workspace)
    torch.manual_seed(0)
    RewardModel(kernels=8, hidden=16).save(Paths(workspace).reward_model)
    stand_in_judge(workspace)  # the held-out judge promote.judge_guard reads
    return workspace


def register(root, kind: str, std: float = 0.3, record: bool = True) -> str:
    """Register a restorer that returns the LQ ("identity") or LQ plus structured noise ("noisy")
    as the rl stage does: tagged with the reward model's hash and, with `record`, named in
    metrics/rl.json as the version this workspace's rl stage registered."""
    params = smoke_params()
    model = PixelRestorer.build(params.model)
    if kind == "noisy":
        torch.nn.init.normal_(model.unet.conv_out.weight, std=std, generator=torch.Generator().manual_seed(0))
    ckpt = root / "checkpoints" / f"{kind}{std}"
    model.save_pretrained(ckpt)
    with tracking.stage_run("rl", params, ["rl"], root) as run:
        version = register_restorer(params, ckpt, {
            "restorl.stage": "rl", "restorl.run_id": run.info.run_id,
            "restorl.reward_hash": file_hash(Paths(root).reward_model)})
    if record:
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics/rl.json").write_text(json.dumps(
            {"registered": {"model": NAME, "version": version, "run_id": run.info.run_id}}))
    return version


def promote(root, **promote_cfg) -> promote_stage.Decision:
    return promote_stage.run(smoke_params(promote=promote_cfg), root)


def aliases(client) -> dict:
    return {k: str(v) for k, v in client.get_registered_model(NAME).aliases.items()}


def promote_runs(client) -> list:
    experiment = client.get_experiment_by_name("restorl")
    return client.search_runs([experiment.experiment_id], "tags.`restorl.stage` = 'promote'")


def test_first_model_becomes_champion_with_its_real_figures(store):
    version = register(store, "identity")
    decision = promote(store)
    client = MlflowClient()
    assert decision.outcome == "promoted" and "first model" in decision.reason
    assert aliases(client)["champion"] == version
    # The identity model's PSNR is the LQ's: the figures come from real restorations.
    test = load_split(Paths(store).data, "test")
    lq_psnr = float(iqa.score("psnr", test.lq, test.gt).mean())
    tags = client.get_model_version(NAME, version).tags
    assert float(tags["restorl.promote.psnr"]) == pytest.approx(lq_psnr, abs=0.01)
    assert tags["restorl.promote.decision"] == "promoted" and tags["restorl.promote.against"] == "none"
    [run] = promote_runs(client)
    assert run.info.run_name == "promote" and run.data.tags["restorl.promote.decision"] == "promoted"
    assert run.data.metrics["challenger.psnr"] == pytest.approx(lq_psnr, abs=0.01)
    assert json.loads((store / "metrics/promote.json").read_text())["outcome"] == "promoted"
    # The champion restores an image through the registry URI a deployment uses.
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    batch = ((test.lq[:2] + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert model.predict(batch) == pytest.approx(batch, abs=1e-5)


def test_better_challenger_is_promoted(store):
    worse = register(store, "noisy")
    promote(store)
    better = register(store, "identity")
    # psnr: a full-reference reward (needs the GT passed along). The stand-in judge is untrained,
    # so its view of noise is arbitrary: its guard is tested on its own.
    decision = promote(store, reward="psnr", judge_guard=None)
    client = MlflowClient()
    assert decision.outcome == "promoted", decision.reason
    assert decision.champion == worse
    assert aliases(client) == {"champion": better, "challenger": better}
    new, old = decision.figures["challenger"], decision.figures["champion"]
    assert new["psnr"] > old["psnr"] and new["ssim"] > old["ssim"] and new["reward"] > old["reward"]
    assert new["gmsd"] < old["gmsd"]  # the independent judge (lower is better) agrees
    tags = client.get_model_version(NAME, better).tags
    assert tags["restorl.promote.against"] == worse
    assert float(tags["restorl.promote.champion_psnr"]) == pytest.approx(old["psnr"], rel=1e-4)


def test_the_default_reward_is_the_learned_one_the_challenger_was_trained_with(store):
    """`learned` scores restorations with checkpoints/reward; a reward model other than the one
    the version records (restorl.reward_hash) cannot judge it."""
    from pipeline.models.loading import load_restorer
    from pipeline.models.sampling import restore_split
    from pipeline.rewards.scorers import LearnedScorer

    version = register(store, "noisy")
    decision = promote(store)
    assert decision.outcome == "promoted" and decision.reward == "learned"
    test = load_split(Paths(store).data, "test")
    restored = restore_split(load_restorer(store / "checkpoints/noisy0.3"), test, smoke_params())
    expected = float(LearnedScorer(Paths(store).reward_model, torch.device("cpu"))(restored).mean())
    assert decision.figures["challenger"]["reward"] == pytest.approx(expected, abs=1e-5)

    register(store, "identity")
    torch.manual_seed(1)
    RewardModel(kernels=8, hidden=16).save(Paths(store).reward_model)  # another reward model
    with pytest.raises(promote_stage.PromotionError, match=r"checkpoints/reward is not the reward model v2 "
                                                            r"was trained with"):
        promote(store)
    assert aliases(MlflowClient())["champion"] == version


def test_a_challenger_that_games_its_reward_is_refused_by_the_independent_judge():
    """Reward up, PSNR and SSIM within tolerance, GMSD (never trained on) clearly worse: refused."""
    params = smoke_params()
    champion = {"reward": -6.3, "psnr": 30.0, "ssim": 0.900, "gmsd": 0.040, "judge": 0.5}
    gamed = {"reward": -5.0, "psnr": 29.95, "ssim": 0.898, "gmsd": 0.050, "judge": 0.5}
    outcome, reason = promote_stage.judge({"challenger": gamed, "champion": champion}, params)
    assert outcome == "refused" and reason.startswith("gmsd 0.05 is 0.01 worse") and "psnr" not in reason
    honest = gamed | {"gmsd": 0.041}
    assert promote_stage.judge({"challenger": honest, "champion": champion}, params)[0] == "promoted"


def test_a_challenger_the_held_out_judge_scores_lower_is_refused():
    """Reward up, every full-reference guard within tolerance, but the held-out judge (a
    no-reference model neither the reward nor RL saw images of) scores it lower: refused.
    Within promote.judge_guard, or with the guard off, the same figures are promoted."""
    champion = {"reward": -6.3, "psnr": 30.0, "ssim": 0.900, "gmsd": 0.040, "judge": 0.50}
    gamed = {"reward": -5.0, "psnr": 29.98, "ssim": 0.899, "gmsd": 0.041, "judge": 0.45}
    figures = {"challenger": gamed, "champion": champion}
    outcome, reason = promote_stage.judge(figures, smoke_params())  # the default guard: 0
    assert outcome == "refused", reason
    assert reason == "held-out judge 0.45 fell 0.05 below the champion's 0.5 (promote.judge_guard 0)"
    outcome, reason = promote_stage.judge(figures, smoke_params(promote={"judge_guard": 0.1}))
    assert outcome == "promoted" and "held-out judge 0.45 (champion 0.5) within promote.judge_guard" in reason
    off = smoke_params(promote={"judge_guard": None})
    assert promote_stage.judge(figures, off)[0] == "promoted"
    # With the guard on, a missing judge figure is no decision.
    with pytest.raises(promote_stage.PromotionError, match=r"challenger: figures \['judge'\] missing"):
        promote_stage.judge({"challenger": {k: v for k, v in gamed.items() if k != "judge"}, "champion": champion},
                            smoke_params())


def test_a_negative_judge_guard_is_a_params_error_naming_the_key():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"promote\.judge_guard: -0\.5 must be >= 0 \(or null: no judge check\)"):
        smoke_params(promote={"judge_guard": -0.5})
    assert smoke_params(promote={"judge_guard": None}).promote.judge_guard is None


def test_the_held_out_judge_scores_both_and_is_needed_when_it_guards(store):
    """The judge figure is checkpoints/judge's mean score of the version's test restorations; with
    promote.judge_guard set and no judge, promote is one error naming the key and the file and
    changes nothing; with the guard off it needs no judge."""
    from pipeline.models.loading import load_restorer
    from pipeline.models.sampling import restore_split
    from pipeline.rewards.scorers import LearnedScorer

    version = register(store, "noisy")
    decision = promote(store)
    test = load_split(Paths(store).data, "test")
    restored = restore_split(load_restorer(store / "checkpoints/noisy0.3"), test, smoke_params())
    expected = float(LearnedScorer(Paths(store).judge_model, torch.device("cpu"))(restored).mean())
    assert decision.figures["challenger"]["judge"] == pytest.approx(expected, abs=1e-5)
    tags = MlflowClient().get_model_version(NAME, version).tags
    assert float(tags["restorl.promote.judge"]) == pytest.approx(expected, rel=1e-4)

    register(store, "identity")
    shutil.rmtree(Paths(store).judge_model)
    with pytest.raises(promote_stage.PromotionError, match=r"promote\.judge_guard is 0\.0 but there is no held-out "
                                                            r"judge at .*checkpoints/judge/model\.safetensors"):
        promote(store)
    assert aliases(MlflowClient())["champion"] == version and len(promote_runs(MlflowClient())) == 1
    decision = promote(store, judge_guard=None)
    assert "judge" not in decision.figures["challenger"] and "judge" not in decision.figures["champion"]


def test_guards_cannot_ratchet_down_along_the_champion_lineage(store):
    """v2 loses a little PSNR against v1 and is promoted; v3 loses as little against v2 but more
    than the tolerance against v1, the lineage's best: refused."""
    v1 = register(store, "identity")
    promote(store)
    v2 = register(store, "noisy", std=0.02)
    v3 = register(store, "noisy", std=0.04, record=False)
    psnr = {v: float(MlflowClient().get_model_version(NAME, v1).tags["restorl.promote.psnr"]) for v in [v1]}
    test = load_split(Paths(store).data, "test")
    from pipeline.models.loading import load_restorer
    from pipeline.models.sampling import restore_split

    for v, folder in ((v2, "noisy0.02"), (v3, "noisy0.04")):
        restored = restore_split(load_restorer(store / "checkpoints" / folder), test, smoke_params())
        psnr[v] = float(iqa.score("psnr", restored, test.gt).mean())
    steps = psnr[v1] - psnr[v2], psnr[v2] - psnr[v3]
    tolerance = 0.7 * (psnr[v1] - psnr[v3])
    assert 0 < max(steps) < tolerance, (psnr, tolerance)  # each step alone is within the tolerance
    loose = {"min_reward_gain": -1e9, "guards": {"psnr": tolerance, "ssim": 1.0, "gmsd": 1.0}}
    assert promote(store, **loose).outcome == "promoted"
    best = MlflowClient().get_model_version(NAME, v2).tags["restorl.promote.best.psnr"]
    assert float(best) == pytest.approx(psnr[v1], abs=1e-4)  # v2 carries v1's PSNR forward
    (store / "metrics/rl.json").write_text(json.dumps({"registered": {
        "model": NAME, "version": v3, "run_id": MlflowClient().get_model_version(NAME, v3).tags["restorl.run_id"]}}))
    decision = promote(store, **loose)
    assert decision.outcome == "refused" and decision.champion == v2
    assert "psnr" in decision.reason and "lineage's best" in decision.reason
    assert decision.lineage_best["psnr"] == pytest.approx(psnr[v1], abs=1e-4)
    assert aliases(MlflowClient())["champion"] == v2


def test_promote_judges_the_version_its_rl_stage_registered_not_the_alias(store):
    """Another workspace's run moved `challenger` after this one's rl stage registered v1."""
    mine = register(store, "identity")
    other = register(store, "noisy", record=False)
    client = MlflowClient()
    assert aliases(client)["challenger"] == other
    decision = promote(store)
    assert decision.challenger == mine and aliases(client)["champion"] == mine
    # A version number that exists but was registered by another run: a different store.
    (store / "metrics/rl.json").write_text(json.dumps({"registered": {"model": NAME, "version": other,
                                                                      "run_id": "someone-else"}}))
    with pytest.raises(promote_stage.PromotionError, match=r"v2 .* was registered by run \w+, not by this "
                                                            r"workspace's rl run someone-else"):
        promote(store)


def test_a_champion_moved_during_the_judgement_is_not_overwritten(store, monkeypatch):
    """Compare-and-set: a second promote moves `champion` while this one scores (caused here by
    moving the alias from inside the scoring call: two real processes cannot be timed to race)."""
    first = register(store, "noisy")
    promote(store)
    elsewhere = register(store, "noisy", std=0.1, record=False)
    challenger = register(store, "identity")
    score = promote_stage.score_version

    def score_while_another_promote_moves_the_alias(*args, **kwargs):
        figures = score(*args, **kwargs)
        MlflowClient().set_registered_model_alias(NAME, "champion", elsewhere)
        return figures

    monkeypatch.setattr(promote_stage, "score_version", score_while_another_promote_moves_the_alias)
    with pytest.raises(promote_stage.PromotionError, match=f"'champion' moved from v{first} to v{elsewhere} "
                                                           f"while v{challenger} was being judged"):
        promote(store, min_reward_gain=-1e9)
    client = MlflowClient()
    assert aliases(client)["champion"] == elsewhere
    assert not any(k.startswith("restorl.promote.") for k in client.get_model_version(NAME, challenger).tags)


def test_fidelity_regression_is_refused_even_if_the_reward_allows_it(store):
    champion = register(store, "identity")
    promote(store)
    challenger = register(store, "noisy")
    # Any reward change is accepted, so only the guards can refuse it.
    decision = promote(store, min_reward_gain=-1e9)
    client = MlflowClient()
    assert decision.outcome == "refused"
    assert all(m in decision.reason for m in ("psnr", "ssim", "gmsd")) and "learned" not in decision.reason
    assert aliases(client)["champion"] == champion
    tags = client.get_model_version(NAME, challenger).tags
    assert tags["restorl.promote.decision"] == "refused" and "psnr" in tags["restorl.promote.reason"]
    assert float(tags["restorl.promote.psnr"]) < float(tags["restorl.promote.champion_psnr"]) - 0.1
    run = client.get_run(tags["restorl.promote.run_id"])
    assert run.data.metrics["promoted"] == 0.0


def test_insufficient_reward_gain_is_refused_in_the_lower_is_better_direction(store):
    register(store, "identity")
    promote(store)
    register(store, "identity")  # same quality: zero gain, fidelity equal
    decision = promote(store, reward="piqe", min_reward_gain=0.5)
    assert iqa.lower_is_better("piqe")
    new, old = decision.figures["challenger"], decision.figures["champion"]
    assert new["reward"] == pytest.approx(old["reward"], abs=1e-4)
    assert decision.outcome == "refused" and decision.reason.startswith("piqe gain ")
    assert "< required +0.5" in decision.reason and "psnr" not in decision.reason
    # A zero required gain lets the equal model through (tolerances hold with equality).
    assert promote(store, reward="piqe", min_reward_gain=0.0).outcome == "promoted"


def test_repeated_promote_is_a_no_op(store):
    register(store, "identity")
    promote(store)
    challenger = register(store, "noisy")
    first = promote(store)
    client = MlflowClient()
    tags_before, runs_before = client.get_model_version(NAME, challenger).tags, len(promote_runs(client))
    again = promote(store)
    assert first.outcome == "refused" and again.outcome == "unchanged"
    assert "already judged" in again.reason and "refused" in again.reason
    assert client.get_model_version(NAME, challenger).tags == tags_before
    assert len(promote_runs(client)) == runs_before
    # Different settings are a new question, so it is judged again.
    loose = {"psnr": 100, "ssim": 1, "gmsd": 1}
    assert promote(store, min_reward_gain=-1e9, guards=loose).outcome == "promoted"
    assert promote(store).outcome == "unchanged"  # challenger is now champion


def test_missing_metrics_refuse_without_changing_anything(store):
    champion = register(store, "identity")
    promote(store)
    challenger = register(store, "identity")
    with pytest.raises(promote_stage.PromotionError, match="figures missing.*no_such_metric"):
        promote(store, reward="no_such_metric")
    client = MlflowClient()
    assert aliases(client)["champion"] == champion
    assert not any(k.startswith("restorl.promote.") for k in client.get_model_version(NAME, challenger).tags)


def test_judges_that_cannot_be_independent_are_refused(store):
    register(store, "identity")
    with pytest.raises(promote_stage.PromotionError, match=r"promote.guards.gmsd: the challenger was trained "
                                                            r"on gmsd \(rl.reward\)"):
        promote_stage.run(smoke_params(rl={"reward": {"learned": 1.0, "gmsd": 0.1}}), store)
    with pytest.raises(promote_stage.PromotionError, match="promote.guards.piqe: not a full-reference metric"):
        promote(store, guards={"piqe": 1.0})
    with pytest.raises(promote_stage.PromotionError, match="promote.guards.gmsdd: 'gmsdd' is not a pyiqa metric"):
        promote(store, guards={"gmsdd": 1.0})
    assert "champion" not in aliases(MlflowClient())


def test_no_registered_rl_version_is_a_clear_refusal(store):
    with pytest.raises(promote_stage.PromotionError, match=r"metrics/rl.json not found: promote judges the "
                                                            r"version this workspace's rl stage registered"):
        promote(store)


def test_cli_refusal_is_one_error_line_and_exit_2(tmp_path):
    raw = smoke_raw()
    raw["promote"] = {"reward": "piqe"}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "promote"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "error: metrics/rl.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics").exists()


def test_judge_reads_the_reward_direction_from_the_metric():
    """PIQE is lower-is-better: a challenger 10 below the champion gains +10, one 10 above loses."""
    params = smoke_params(promote={"reward": "piqe", "min_reward_gain": 1.0})
    fidelity = {"psnr": 30.0, "ssim": 0.9, "gmsd": 0.04, "judge": 0.5}
    better = {"challenger": {"reward": 40.0, **fidelity}, "champion": {"reward": 50.0, **fidelity}}
    outcome, reason = promote_stage.judge(better, params)
    assert outcome == "promoted" and reason.startswith("piqe gain +10")
    worse = {"challenger": {"reward": 50.0, **fidelity}, "champion": {"reward": 40.0, **fidelity}}
    assert promote_stage.judge(worse, params)[0] == "refused"
    as_psnr = smoke_params(promote={"reward": "psnr", "min_reward_gain": 1.0})  # higher is better
    assert promote_stage.judge(worse, as_psnr)[0] == "promoted"
    learned = smoke_params(promote={"reward": "learned", "min_reward_gain": 1.0})  # higher is better
    assert promote_stage.judge(worse, learned)[0] == "promoted"


def test_the_summary_separates_each_name_from_its_figures():
    from pipeline.stages.promote import Decision, format_decision

    figures = {"challenger": {"reward": 1.0, "psnr": 30.0}, "champion": {"reward": 0.5, "psnr": 30.1}}
    text = format_decision(Decision("promoted", "2", "1", "better", "learned", figures))
    assert "challenger reward=1.0000" in text and "champion   reward=0.5000" in text


def test_the_registered_model_restores_as_evaluate_does_by_default(store):
    """The pyfunc's defaults are the evaluated sampling (evaluate.sampling, runtime.seed): called
    with nothing but the task, it returns evaluate's restoration of the same patches."""
    from pipeline.models.loading import load_restorer
    from pipeline.models.sampling import restore_split

    version = register(store, "noisy")
    params = smoke_params()
    test = load_split(Paths(store).data, "test")
    some = type(test)(test.gt[:3], test.lq[:3], test.samples[:3])
    expected = restore_split(load_restorer(store / "checkpoints/noisy0.3"), some, params)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    batch = ((some.lq + 1) / 2).permute(0, 2, 3, 1).numpy()
    restored = model.predict(batch)
    assert restored == pytest.approx(((expected + 1) / 2).permute(0, 2, 3, 1).numpy(), abs=1e-5)
    tags = MlflowClient().get_model_version(NAME, version).tags
    assert json.loads(tags["restorl.sampling"]) == params.evaluate.sampling.model_dump() | {"seed": 0}
    assert model.predict(batch, params={"steps": 1}) != pytest.approx(restored, abs=1e-4)  # params still override


def test_registering_and_loading_a_restorer_prints_no_mlflow_advice(tmp_path):
    """MLflow advises type hints and an input example for a pyfunc without them, and warns that
    a pyfunc object is pickled with CloudPickle; the restorer's signature is explicit and it is
    logged from code, so defining, logging and loading it warn nothing."""
    script = (
        "import mlflow, numpy as np\n"
        "from pipeline.models.pyfunc import log_restorer\n"
        "from pipeline.models.restorer import PixelRestorer\n"
        "from tests.conftest import smoke_params\n"
        "PixelRestorer.build(smoke_params().model).save_pretrained('ckpt')\n"
        "mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "with mlflow.start_run():\n"
        "    info = log_restorer(__import__('pathlib').Path('ckpt'), 'restorer')\n"
        "mlflow.pyfunc.load_model(info.model_uri)\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", script], cwd=tmp_path,
                          env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for advice in ("Add type hints to the `predict` method", "An input example was not provided", "CloudPickle"):
        assert advice not in proc.stderr
