"""`restorl ablate` without running experiments: method profiles as `dvc exp run -S` values
(applied by DVC's own override code), the workspace check, reading `dvc exp show --json`, the
tables from real evaluate metrics and rl_curves.csv files, and the command's option errors."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from pipeline.config import PROFILES_DIR, deep_merge, read_yaml, validate
from pipeline.data.dataset import PairedSplit
from pipeline.experiments import ablation
from pipeline.scoring import score_outputs
from pipeline.stages.rl import write_curves
from tests.conftest import BIN, REPO, run_tool, smoke_raw, write_params


def _apply_with_dvc(tmp_path, base: dict, sets: list[str]) -> dict:
    """What `dvc exp run -S ...` makes of params.yaml (DVC's hydra override code)."""
    from dvc.utils.hydra import apply_overrides

    path = write_params(tmp_path, base)
    apply_overrides(path, sets)
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("method", ["ddpo", "coca", "lrpo", "rfsr"])
def test_method_overrides_give_the_profile_merge(tmp_path, method):
    base = smoke_raw()
    sets = ablation.overrides(method, 2, base, epochs=1)
    expected = deep_merge(base, read_yaml(PROFILES_DIR / "methods" / f"{method}.yaml"))
    expected["rl"] |= {"seed": 2, "epochs": 1}
    got = _apply_with_dvc(tmp_path, base, sets)
    assert validate(got, "exp params") == validate(expected, "profile merge")
    # A key params.yaml lacks is appended (hydra `+`); DVC refuses a plain override of it.
    assert ("+rl.reward.psnr=0.1" in sets) == (method == "lrpo")


def test_seed_method_and_sign_flip(tmp_path):
    base = deep_merge(smoke_raw(), {"rl": {"reward": {"learned": 1.0, "psnr": 0.1}}})
    assert ablation.overrides("adaptive", 0, base, epochs=None) == ["rl.seed=0"]
    flipped = _apply_with_dvc(tmp_path, base, ablation.overrides("flipped", 1, base, epochs=None))
    assert flipped["rl"]["reward"] == {"learned": -1.0, "psnr": -0.1} and flipped["rl"]["seed"] == 1
    assert validate(flipped, "flipped").rl.reward["learned"] == -1.0  # a negative weight is accepted


def test_hydra_values_round_trip(tmp_path):
    tree = {"a": {"s": "two words", "t": "true", "n": None, "l": ["x", 1, 2.5], "e": [], "f": -0.25, "b": False}}
    sets = ablation.set_params(tree, {"a": {}})
    assert all(s.startswith("+a.") for s in sets)
    assert _apply_with_dvc(tmp_path, {"a": {}}, sets) == tree


def test_workspace_check_says_run_repro_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ablation.AblationError, match="restorl workspace"):
        ablation.check_workspace()
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    write_params(tmp_path, smoke_raw())
    with pytest.raises(ablation.AblationError, match="run `restorl repro` first"):
        ablation.check_workspace()


def test_experiments_by_name_reads_exp_show_json():
    data = {"params": {}, "metrics": {"metrics/rl.json": {"data": {"seconds": 1.0}}}}
    shown = [{"rev": "workspace", "name": None, "data": data},
             {"rev": "abc", "name": "master", "data": data,
              "experiments": [{"name": "ddpo-s0", "revs": [{"rev": "d1", "name": "ddpo-s0", "data": data}]},
                              {"name": "coca-s0", "revs": [{"rev": "c1", "name": "coca-s0", "data": data}]}]},
             {"rev": "old", "name": None, "data": data,
              "experiments": [{"name": "x", "revs": [{"rev": "x1", "name": "rfsr-s0", "data": data}]}]}]
    found = ablation.experiments_by_name(shown, "abc")
    assert set(found) == {"ddpo-s0", "coca-s0"} and found["coca-s0"][0] == "c1"


def _runs(tmp_path) -> list:
    """Two methods x two seeds from real evaluate metrics and real rl_curves.csv files."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    lq = (gt + 0.2 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    data = PairedSplit(gt, lq, [{"task": "gaussian_noise", "id": str(i)} for i in range(4)])
    runs = []
    for method in ("ddpo", "coca"):
        for seed in (0, 1):
            shift = 0.05 * seed + (0.1 if method == "coca" else 0.0)
            outputs = {"lq": lq, "sft": (lq * 0.5 + gt * 0.5), "rl": (lq * (0.5 - shift) + gt * (0.5 + shift)),
                       "sft_dither": lq}
            metrics = score_outputs(outputs, data, ["psnr", "ssim"], ["piqe"],
                                    {"reward": lambda x: -x.std(dim=(1, 2, 3))})
            history = [{"epoch": e, "reward.final.mean": 0.1 * e + shift, "val_reward": 0.2 * e} for e in (1, 2)]
            curves = tmp_path / f"{method}{seed}.csv"
            write_curves(curves, history)
            rl = {"epochs": 2, "rollouts": 16, "seconds": 10.0 + seed, "best_epoch": 2, "val_reward_gain": shift}
            runs.append(ablation.Run(method, seed, f"{method}-s{seed}", rl, metrics, 4, 2,
                                     ablation.read_curves(curves.read_text())))
    return runs


def test_tables(tmp_path):
    runs = _runs(tmp_path)
    table = ablation.results_table(runs, psnr_guard=0.3).splitlines()
    assert table[0].startswith("| row | seeds | reward ↑ | PIQE ↓ | PSNR ↑ | SSIM ↑ | reward gain | improves? | "
                               "val reward gain")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table[2:]}
    assert list(rows) == ["DDPO", "CoCA (DDPO + CoCA credit)", "SFT", "SFT + dither"]
    psnr = [r.evaluate["overall"]["rl"]["psnr"] for r in runs if r.method == "ddpo"]
    assert rows["DDPO"][1] == "0,1" and rows["DDPO"][4] == ablation.mean_std(psnr, ".2f")
    gains = [r.evaluate["overall"]["rl"]["reward"] - r.evaluate["overall"]["sft"]["reward"]
             for r in runs if r.method == "ddpo"]
    assert rows["DDPO"][6] == ablation.mean_std(gains, ".3f")
    assert rows["DDPO"][8:] == ["0.025 ± 0.0354", "2.0 ± 0.0", "10.5 ± 0.7", "16 |"]
    assert rows["SFT"][4] == f"{runs[0].evaluate['overall']['sft']['psnr']:.2f}"

    efficiency = ablation.efficiency_table(runs).splitlines()
    assert efficiency[0] == ("| epoch | rollouts | ddpo rollout reward | ddpo val reward | "
                             "coca rollout reward | coca val reward |")
    assert efficiency[3].startswith("| 2 | 16 | 0.2250 ± 0.0354 | 0.4000 ± 0.0000 | 0.3250 ± 0.0354")
    assert ablation.mean_std([1.0], ".2f") == "1.00"


def test_verdict_needs_a_gain_beyond_the_flipped_run_the_hacks_and_the_spread(tmp_path):
    runs = _runs(tmp_path)
    overall = runs[0].evaluate["overall"]
    sft = overall["sft"]

    def runs_with(gains, psnr_drop=0.0, lows=None):
        """Runs whose paired interval's lower end is `lows[i]` (default: half the gain)."""
        lows = lows or [g / 2 for g in gains]
        return [ablation.Run("m", i, f"m-s{i}", {}, {"overall": overall | {"rl": {
            "reward": sft["reward"] + g, "psnr": sft["psnr"] - psnr_drop}},
            "rl_vs_sft": {"reward": {"diff": g, "lo": lo, "hi": g + abs(g)}}}, 4, 2, [])
            for i, (g, lo) in enumerate(zip(gains, lows))]

    hack = max(overall[k]["reward"] - sft["reward"] for k in overall if k.startswith("sft_"))
    flipped = runs_with([-0.1, -0.2])
    clear = max(hack, 0.0) + 1.0
    assert ablation.verdict(runs_with([clear, clear + 0.1]), flipped, overall, 0.3) == "yes"
    assert ablation.verdict(runs_with([clear, clear], psnr_drop=0.5), flipped, overall, 0.3) == "no: PSNR -0.50 dB"
    # rl.psnr_guard sets the PSNR bar
    assert ablation.verdict(runs_with([clear, clear], psnr_drop=0.5), flipped, overall, 0.6) == "yes"
    # the same mean gain with a seed spread that reaches down into the flipped run's range
    assert "within the flipped run" in ablation.verdict(runs_with([clear - 3, clear + 3]), flipped, overall, 0.3)
    assert "within a hack" in ablation.verdict(runs_with([hack - 0.01, hack - 0.01]), runs_with([-5.0]), overall,
                                               0.3)
    # a clear mean gain that one seed's test patches do not support with confidence
    assert ablation.verdict(runs_with([clear, clear + 0.1], lows=[0.2, -0.01]), flipped, overall, 0.3) == (
        "no: interval reaches 0 (seed 1)")


def test_report_states_the_psnr_guard_it_applied(tmp_path):
    runs = _runs(tmp_path)
    text = ablation.report(runs, psnr_guard=0.45)
    assert "PSNR down by at most 0.45 dB (rl.psnr_guard)" in text
    assert ablation.results_table(runs, 0.45) in text


def test_methods_and_seeds_options():
    assert ablation.chosen_methods([]) == list(ablation.METHODS)
    assert ablation.chosen_methods(["ddpo coca", "flipped", "ddpo"]) == ["ddpo", "coca", "flipped"]
    assert ablation.chosen_seeds([]) == [0, 1, 2]
    assert ablation.chosen_seeds(["3 1", "4"]) == [3, 1, 4]
    with pytest.raises(ablation.AblationError, match="--seeds: 'x' is not a seed"):
        ablation.chosen_seeds(["1 x"])


def test_ablate_command_names_an_unknown_method(tmp_path):
    proc = run_tool([str(BIN / "restorl"), "ablate", "--methods", "ddpo", "--methods", "nosuch"], tmp_path,
                    check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error: --methods: unknown method 'nosuch'; the methods are adaptive" in proc.stderr
