"""A killed `restorl sft` resumes from its last checkpoint and ends where an uninterrupted run does."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import BIN, kill_mid_run, run_tool, smoke_raw, write_params


def _params(root, **sft):
    raw = smoke_raw()
    # Enough steps that a kill lands mid-run; checkpoints every few steps.
    raw["sft"] |= {"steps": 40, "checkpoint_every": 5, "batch_size": 16} | sft
    write_params(root, raw)


SHORT = {"steps": 20, "checkpoint_every": 2, "batch_size": 4}  # where only "resumed or not" matters


def _weights(root):
    return load_file(root / "checkpoints/sft/unet/diffusion_pytorch_model.safetensors")


@pytest.mark.e2e
def test_killed_sft_resumes_and_matches_uninterrupted_run(workspace, tmp_path_factory):
    import shutil

    reference = tmp_path_factory.mktemp("uninterrupted")
    shutil.copytree(workspace / "data", reference / "data")
    _params(reference)
    run_tool([str(BIN / "restorl"), "sft"], reference)

    _params(workspace)
    state = workspace / "checkpoints/resume/sft/state.pt"
    # Killed twice (the second time after resuming from the first kill), then run to the end.
    first = kill_mid_run([str(BIN / "restorl"), "sft"], workspace, state)
    second = kill_mid_run([str(BIN / "restorl"), "sft"], workspace, state, after_step=first)
    assert not (workspace / "checkpoints/sft").exists(), "a killed run must not leave a final model"
    assert 0 < first < second < 40

    resumed = run_tool([str(BIN / "restorl"), "sft"], workspace)
    assert f"resuming from step {second}" in resumed.stdout
    assert not state.exists(), "a finished run clears its resume state"
    # Exactly the same run (deterministic on the CPU): the weights and the loss curve.
    a, b = _weights(reference), _weights(workspace)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert (reference / "plots/sft_loss.csv").read_text() == (workspace / "plots/sft_loss.csv").read_text()


def _run_in_process(root, monkeypatch):
    """`restorl sft` in this process (its output to capsys): where nothing needs a kill, the
    stage's import is not paid again."""
    from pipeline.config import load_params
    from pipeline.stages import sft

    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    sft.run(load_params(root / "params.yaml"), root)


def test_resume_state_for_other_params_is_ignored(workspace, monkeypatch, capsys):
    _params(workspace, **SHORT)
    # Plant a state from a different config: the run must not resume from it.
    from pipeline import checkpoint

    g = torch.Generator()
    checkpoint.save_state(workspace / "checkpoints/resume/sft", fingerprint="other", step=10,
                          objects={}, generator=g, stats={"loss": [1.0] * 10})
    _run_in_process(workspace, monkeypatch)
    out = capsys.readouterr().out
    assert "starting fresh" in out and "resuming" not in out


def test_resume_state_for_other_data_is_ignored(workspace):
    """Same params, other prepared data (the manifest changed): the killed run's state is not resumed."""
    import json

    _params(workspace, **SHORT)
    state = workspace / "checkpoints/resume/sft/state.pt"
    assert kill_mid_run([str(BIN / "restorl"), "sft"], workspace, state) > 0
    manifest = workspace / "data/prepared/manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"note": "re-prepared"}))
    out = run_tool([str(BIN / "restorl"), "sft"], workspace)
    assert "starting fresh" in out.stdout and "resuming" not in out.stdout


def test_an_unreadable_resume_state_is_moved_aside_not_a_traceback(workspace, monkeypatch, capsys):
    """A state.pt cut short (a full disk, a kill mid-copy) must not block every re-run."""
    state = workspace / "checkpoints/resume/sft/state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"PK\x03\x04 truncated")
    write_params(workspace, smoke_raw())
    _run_in_process(workspace, monkeypatch)
    out = capsys.readouterr().out
    assert f"{state.relative_to(workspace)}: unreadable" in out and "starting fresh" in out
    assert (state.parent / "state.pt.unreadable").read_bytes() == b"PK\x03\x04 truncated"
    assert (workspace / "checkpoints/sft/unet/diffusion_pytorch_model.safetensors").exists()


def test_resume_state_of_other_code_is_ignored(workspace, monkeypatch):
    """Same params and data, but the code the stage runs changed (as after a `git pull`): the
    killed run's state is not resumed. The stage runs from a copy of the package, edited between
    the two runs."""
    import shutil
    import sys

    from tests.conftest import REPO

    code = workspace.parent / f"{workspace.name}-code"
    shutil.copytree(REPO / "pipeline", code / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", str(code))
    args = [sys.executable, "-m", "pipeline.cli", "sft"]
    where = run_tool([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], workspace).stdout
    assert where.strip() == str(code / "pipeline" / "__init__.py"), "the copy is the code that runs"

    _params(workspace, **SHORT)
    state = workspace / "checkpoints/resume/sft/state.pt"
    assert kill_mid_run(args, workspace, state) > 0
    restorer = code / "pipeline" / "models" / "restorer.py"  # code the sft stage runs
    restorer.write_text(restorer.read_text() + "\n# a change to the sampler's module\n")
    out = run_tool(args, workspace)
    assert "saved for other params, data or code" in out.stdout and "resuming" not in out.stdout


class _Planted:
    """What an attacker with write access to the resume volume could pickle into state.pt."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_resume_state_is_read_as_data_never_as_code(tmp_path):
    from pipeline import checkpoint

    marker = tmp_path / "code-ran"
    (tmp_path / "resume").mkdir()
    torch.save({"fingerprint": "f", "step": 3, "rng": {}, "stats": {"x": _Planted(marker)}, "objects": {}},
               tmp_path / "resume" / checkpoint.STATE_FILE)
    assert checkpoint.load_state(tmp_path / "resume", fingerprint="f", objects={},
                                 generator=torch.Generator()) is None  # refused, moved aside, fresh start
    assert not marker.exists()
    assert (tmp_path / "resume" / f"{checkpoint.STATE_FILE}.unreadable").exists()


def test_resumed_ema_weights_sit_on_the_model_device(workspace, monkeypatch, capsys):
    """The resume state is read onto the CPU; the EMA's shadow weights must follow the model to
    its device, or the first EMA step after a resume on a GPU worker fails. On a CPU-only machine
    both are the CPU: this guards the invariant, and catches a regression only where the model
    runs on another device (a GPU run)."""
    from diffusers.training_utils import EMAModel

    from pipeline.config import load_params
    from pipeline.stages import sft

    _params(workspace, **SHORT)
    raw = yaml.safe_load((workspace / "params.yaml").read_text())
    raw["runtime"]["device"] = "cpu"
    write_params(workspace, raw)
    state = workspace / "checkpoints/resume/sft/state.pt"
    assert kill_mid_run([str(BIN / "restorl"), "sft"], workspace, state) > 0
    pairs = []
    step = EMAModel.step

    def step_checking_devices(self, parameters):
        parameters = list(parameters)
        pairs.extend((s.device, p.device) for s, p in zip(self.shadow_params, parameters))
        return step(self, parameters)

    monkeypatch.setattr(EMAModel, "step", step_checking_devices)
    monkeypatch.chdir(workspace)
    sft.run(load_params(workspace / "params.yaml"), workspace)
    assert "resuming from step" in capsys.readouterr().out
    assert pairs and all(shadow == param for shadow, param in pairs)
