"""`restorl promote`: challenger vs champion on the same test split, decisions recorded, idempotent.

Models are real registered pyfunc versions of `restorer`. Their quality is set by
construction, not by training (too slow here): a freshly built restorer has a zero output
layer, so it returns the LQ input exactly ("identity"); random weights in that layer
add structured noise ("noisy"), which costs PSNR and SSIM.
"""

import json
import shutil

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.data.dataset import load_split
from pipeline.model_registry import register_restorer
from pipeline.models.restorer import PixelRestorer
from pipeline.paths import Paths
from pipeline.rewards import iqa
from pipeline.stages import promote as promote_stage
from tests.conftest import BIN, run_tool, smoke_params, smoke_raw, write_params

NAME = "restorer"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An initialised, empty SQLite store: creating its tables takes seconds, copying it none."""
    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(workspace, empty_db, monkeypatch):
    """The prepared smoke workspace with its own SQLite MLflow store."""
    shutil.copy(empty_db, workspace / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    monkeypatch.chdir(workspace)
    return workspace


def register(root, kind: str) -> str:
    """Register a restorer that returns the LQ ("identity") or LQ plus structured noise ("noisy")."""
    params = smoke_params()
    model = PixelRestorer.build(params.model)
    if kind == "noisy":
        torch.nn.init.normal_(model.unet.conv_out.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    ckpt = root / "checkpoints" / kind
    model.save_pretrained(ckpt)
    with tracking.stage_run("sft", params, ["sft"], root) as run:
        return register_restorer(params, ckpt, {"restorl.stage": "sft", "restorl.run_id": run.info.run_id})


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
    decision = promote(store, reward="psnr")  # full-reference reward: needs the GT passed along
    client = MlflowClient()
    assert decision.outcome == "promoted", decision.reason
    assert decision.champion == worse
    assert aliases(client) == {"champion": better, "challenger": better}
    new, old = decision.figures["challenger"], decision.figures["champion"]
    assert new["psnr"] > old["psnr"] and new["ssim"] > old["ssim"] and new["reward"] > old["reward"]
    tags = client.get_model_version(NAME, better).tags
    assert tags["restorl.promote.against"] == worse
    assert float(tags["restorl.promote.champion_psnr"]) == pytest.approx(old["psnr"], rel=1e-4)


def test_fidelity_regression_is_refused_even_if_the_reward_allows_it(store):
    champion = register(store, "identity")
    promote(store)
    challenger = register(store, "noisy")
    # Any reward change is accepted, so only PSNR/SSIM can refuse it.
    decision = promote(store, reward="piqe", min_reward_gain=-1e9)
    client = MlflowClient()
    assert decision.outcome == "refused"
    assert "psnr" in decision.reason and "ssim" in decision.reason and "piqe" not in decision.reason
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
    assert promote(store, min_reward_gain=-1e9, psnr_tolerance=100, ssim_tolerance=1).outcome == "promoted"
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


def test_no_challenger_is_a_clear_refusal(store):
    with pytest.raises(promote_stage.PromotionError, match="no 'challenger' version"):
        promote(store)


def test_cli_refusal_is_one_error_line_and_exit_2(tmp_path):
    raw = smoke_raw()
    raw["promote"] = {"reward": "piqe"}
    write_params(tmp_path, raw)
    proc = run_tool([str(BIN / "restorl"), "promote"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "error: registered model 'restorer' has no 'challenger' version" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics").exists()


def test_judge_reads_the_reward_direction_from_the_metric():
    """PIQE is lower-is-better: a challenger 10 below the champion gains +10, one 10 above loses."""
    params = smoke_params(promote={"reward": "piqe", "min_reward_gain": 1.0})
    fidelity = {"psnr": 30.0, "ssim": 0.9}
    better = {"challenger": {"reward": 40.0, **fidelity}, "champion": {"reward": 50.0, **fidelity}}
    outcome, reason = promote_stage.judge(better, params)
    assert outcome == "promoted" and reason.startswith("piqe gain +10")
    worse = {"challenger": {"reward": 50.0, **fidelity}, "champion": {"reward": 40.0, **fidelity}}
    assert promote_stage.judge(worse, params)[0] == "refused"
    as_psnr = smoke_params(promote={"reward": "psnr", "min_reward_gain": 1.0})  # higher is better
    assert promote_stage.judge(worse, as_psnr)[0] == "promoted"



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
    expected = restore_split(load_restorer(store / "checkpoints/noisy"), some, params)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
    batch = ((some.lq + 1) / 2).permute(0, 2, 3, 1).numpy()
    restored = model.predict(batch)
    assert restored == pytest.approx(((expected + 1) / 2).permute(0, 2, 3, 1).numpy(), abs=1e-5)
    tags = MlflowClient().get_model_version(NAME, version).tags
    assert json.loads(tags["restorl.sampling"]) == params.evaluate.sampling.model_dump() | {"seed": 0}
    assert model.predict(batch, params={"steps": 1}) != pytest.approx(restored, abs=1e-4)  # params still override
