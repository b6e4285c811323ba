"""`restorl ablate` without running experiments: method profiles as `dvc exp run -S` values
(applied by DVC's own override code), the workspace check, reading `dvc exp show --json`, the
tables from real evaluate metrics and rl_curves.csv files, and the command's option errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import yaml

from pipeline import evaluate_record, scoring
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
    expected["rl"] |= {"seed": 2, "epochs": 1, "judge_guard": None}  # the judge judges, it does not choose
    got = _apply_with_dvc(tmp_path, base, sets)
    assert validate(got, "exp params") == validate(expected, "profile merge")
    # A key params.yaml lacks is appended (hydra `+`); DVC refuses a plain override of it.
    assert ("+rl.reward.psnr=0.1" in sets) == (method == "lrpo")


def test_seed_method_and_sign_flip(tmp_path):
    base = deep_merge(smoke_raw(), {"rl": {"reward": {"learned": 1.0, "psnr": 0.1}}})
    assert ablation.overrides("adaptive", 0, base, epochs=None) == ["rl.seed=0", "rl.judge_guard=null"]
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


def test_an_always_changed_source_stage_is_not_stale():
    """`dvc status` always lists the `source` stage (always_changed); only other changes block."""
    assert ablation.stale_stages('{"source": ["always changed"]}') == []
    assert ablation.stale_stages("") == [] and ablation.stale_stages("{}") == []
    changed = '{"source": ["always changed"], "sft": [{"changed deps": {"params.yaml": {"sft.steps": 5}}}]}'
    assert ablation.stale_stages(changed) == ["sft"]


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
    """Two methods x two seeds and one sign-flipped run, from real evaluate metrics (2 tasks x 4
    test patches) and real rl_curves.csv files."""
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(8, 3, 32, 32, generator=g) * 2 - 1
    lq = (gt + 0.2 * torch.randn(gt.shape, generator=g)).clamp(-1, 1)
    data = PairedSplit(gt, lq, [{"task": ("gaussian_noise", "jpeg")[i % 2], "id": str(i)} for i in range(8)])
    runs = []
    for method, seeds in (("ddpo", (0, 1)), ("flipped", (0,)), ("coca", (0, 1))):
        for seed in seeds:
            shift = 0.05 * seed + {"coca": 0.1, "flipped": -0.2}.get(method, 0.0)
            outputs = {"lq": lq, "sft": (lq * 0.5 + gt * 0.5), "rl": (lq * (0.5 - shift) + gt * (0.5 + shift)),
                       "sft_dither": lq}
            metrics = score_outputs(outputs, data, ["psnr", "ssim"], ["piqe"],
                                    {"reward": lambda x: -x.std(dim=(1, 2, 3)), "judge": lambda x: x.mean(dim=(1, 2, 3))})
            history = [{"epoch": e, "reward.final.mean": 0.1 * e + shift, "val_reward": 0.2 * e} for e in (1, 2)]
            curves = tmp_path / f"{method}{seed}.csv"
            write_curves(curves, history)
            rl = {"epochs": 2, "rollouts": 16, "seconds": 10.0 + seed, "best_epoch": 2, "val_reward_gain": shift}
            runs.append(ablation.Run(method, seed, f"{method}-s{seed}", rl, metrics, 4, 2,
                                     ablation.read_curves(curves.read_text())))
    return runs


def _rows(table: str) -> dict[str, list[str]]:
    return {line.split(" | ")[0].strip("| "): [c.strip("| ") for c in line.split(" | ")] for line in table.splitlines()[2:]}


def test_results_table(tmp_path):
    runs = _runs(tmp_path)
    table = ablation.results_table(runs)
    assert table.splitlines()[0] == ("| row | seeds | reward ↑ | judge ↑ | realism ↓ | PSNR ↑ | SSIM ↑ | RL improves? "
                                     "| val reward gain | best epoch | RL s | rollouts |")
    rows = _rows(table)
    # the flipped run after the methods, then SFT and the control: one value each
    assert list(rows) == ["DDPO", "CoCA (DDPO + CoCA credit)", "seed, sign-flipped reward", "SFT", "SFT + dither"]
    ddpo = [r for r in runs if r.method == "ddpo"]
    assert rows["DDPO"][1] == "0,1"
    for col, metric, fmt in ((2, "reward", ".4f"), (3, "judge", ".3f"), (4, "realism", ".3f"), (5, "psnr", ".2f")):
        assert rows["DDPO"][col] == ablation.mean_std([r.evaluate["overall"]["rl"][metric] for r in ddpo], fmt)
        assert rows["SFT"][col] == f"{runs[0].evaluate['overall']['sft'][metric]:{fmt}}"
    assert rows["DDPO"][7].startswith("no: ") and rows["seed, sign-flipped reward"][7] == "–"
    assert rows["DDPO"][8:] == ["0.025 ± 0.0354", "2.0 ± 0.0", "10.5 ± 0.7", "16"]
    assert rows["SFT + dither"][7:] == ["–"] * 5


def test_interval_table_shows_every_seeds_interval_and_the_controls(tmp_path):
    runs = _runs(tmp_path)
    table = ablation.intervals_table(runs)
    rows = [[c.strip("| ") for c in line.split(" | ")] for line in table.splitlines()[2:]]
    coca1 = next(r for r in runs if r.name == "coca-s1").evaluate["vs_sft"]["rl"]["judge"]
    shown = f"{coca1['diff']:+.3f} [{coca1['lo']:+.3f}, {coca1['hi']:+.3f}]"
    assert ["CoCA (DDPO + CoCA credit)", "1", shown] == rows[4][:2] + [rows[4][3]]
    mean = next(r for r in rows if r[:2] == ["**CoCA (DDPO + CoCA credit)**", "mean"])
    judges = [r.evaluate["vs_sft"]["rl"]["judge"] for r in runs if r.method == "coca"]
    said = [evaluate_record.verdict(f, True) for f in judges]
    assert mean[3] == (f"{ablation.mean_std([f['diff'] for f in judges], '+.3f')} "
                       f"({said[0]} 2/2)" if said[0] == said[1] else mean[3])
    dither = runs[0].evaluate["vs_sft"]["sft_dither"]["psnr"]
    assert rows[-1][:2] == ["SFT + dither", "–"]
    assert rows[-1][5] == f"{dither['diff']:+.2f} [{dither['lo']:+.2f}, {dither['hi']:+.2f}] worse"


def test_task_table_has_each_task_method_and_control(tmp_path):
    runs = _runs(tmp_path)
    table = ablation.task_table(runs)
    assert table.splitlines()[0] == "| task | n | row | PSNR ↑ vs SFT | judge ↑ vs SFT | realism ↓ vs SFT |"
    rows = [[c.strip("| ") for c in line.split(" | ")] for line in table.splitlines()[2:]]
    assert [r[:3] for r in rows] == [[t, "4", row] for t in ("gaussian_noise", "jpeg") for row in (
        "DDPO", "CoCA (DDPO + CoCA credit)", "seed, sign-flipped reward", "SFT + dither")]
    ddpo = [r.evaluate["per_task_vs_sft"]["jpeg"]["rl"]["psnr"] for r in runs if r.method == "ddpo"]
    assert rows[4][3].startswith(ablation.mean_std([f["diff"] for f in ddpo], "+.2f") + " (")
    gap = [r.evaluate["per_task"]["jpeg"]["rl"]["psnr"] - r.evaluate["per_task"]["jpeg"]["sft"]["psnr"]
           for r in runs if r.method == "ddpo"]
    assert [f["diff"] for f in ddpo] == pytest.approx(gap, abs=2e-4)
    assert rows[7][5] != "–" and rows[7][5].endswith(("better", "worse", "unclear"))  # a task's own realism


# The bar, on hand-made records: judge and realism gains (realism: lower is better) of two seeds,
# two hack controls, per-task PSNR.
SFT = {"psnr": 30.0, "judge": -14.0, "realism": 5.0}
CONTROLS = {"sft_blur": {"judge": -0.2, "realism": 0.3}, "sft_unsharp": {"judge": 0.1, "realism": -0.4}}


def _iv(diff, lo, hi):
    return {"diff": diff, "lo": lo, "hi": hi}


def _record(judge=(0.3, 0.1, 0.5), realism=(-1.0, -1.5, -0.5), psnr_loss=0.0, task_loss=0.0, controls=CONTROLS):
    rl = {"psnr": round(SFT["psnr"] - psnr_loss, 4), "judge": SFT["judge"] + judge[0],
          "realism": SFT["realism"] + realism[0]}
    vs = {"rl": {"judge": _iv(*judge), "realism": _iv(*realism), "psnr": _iv(-psnr_loss, -psnr_loss - 0.05, 0.0)}}
    vs |= {row: {m: _iv(d, d - 0.01, d + 0.01) for m, d in gains.items()} for row, gains in controls.items()}
    overall = {"sft": SFT, "rl": rl} | {row: {m: SFT[m] + d for m, d in gains.items()} for row, gains in controls.items()}
    per_task = {"jpeg": {"n": 5, "sft": {"psnr": 31.0}, "rl": {"psnr": round(31.0 - task_loss, 4)}},
                "low_light": {"n": 5, "sft": {"psnr": 28.0}, "rl": {"psnr": 28.0}}}
    return {"higher_is_better": {"psnr": True, "judge": True, "realism": False}, "overall": overall, "vs_sft": vs,
            "per_task": per_task}


def _group(*records, method="m"):
    return [ablation.Run(method, seed, f"{method}-s{seed}", {}, rec, 4, 2, []) for seed, rec in enumerate(records)]


FLIPPED = _group(_record(judge=(-0.5, -0.7, -0.3), realism=(2.0, 1.5, 2.5)), method="flipped")


def test_verdict_passes_a_clear_gain_that_keeps_psnr():
    assert ablation.verdict(_group(_record(), _record(judge=(0.2, 0.05, 0.35))), FLIPPED) == "yes"
    # the PSNR bars are "at most": 0.1 dB overall, 0.3 dB on a task
    assert ablation.verdict(_group(_record(psnr_loss=0.1, task_loss=0.3), _record(psnr_loss=0.1)), FLIPPED) == "yes"
    assert ablation.verdict(_group(_record()), []) == "yes"  # no flipped run in this ablation


def test_verdict_needs_the_judge_and_realism_gains_beyond_every_hack_control():
    # the strongest control is not the first one; the mean over seeds is what is compared
    assert ablation.verdict(_group(_record(judge=(0.15, 0.1, 0.2)), _record(judge=(0.04, 0.01, 0.07))), FLIPPED) == (
        "no: judge gain +0.095 within unsharp")
    assert ablation.verdict(_group(_record(judge=(0.1, 0.05, 0.15))), FLIPPED) == "no: judge gain +0.1 within unsharp"
    # realism is lower-is-better: a larger fall of the control is a larger gain
    strong = CONTROLS | {"sft_unsharp": {"judge": 0.1, "realism": -1.2}}
    assert ablation.verdict(_group(_record(controls=strong)), FLIPPED) == "no: realism gain +1 within unsharp"
    both = {"sft_blur": {"judge": 0.5, "realism": -3.0}}
    assert ablation.verdict(_group(_record(controls=both)), FLIPPED) == (
        "no: judge gain +0.3 within blur; realism gain +1 within blur")


def test_verdict_needs_the_gains_beyond_the_flipped_run():
    # a tie with the flipped run is no gain beyond it
    flipped = _group(_record(judge=(0.3, 0.2, 0.5), realism=(-0.9, -1.2, -0.6)), method="flipped")
    assert ablation.verdict(_group(_record()), flipped) == "no: judge gain +0.3 within the flipped run"
    # the flipped run's mean (1.025) against the method's (1): a tie or more is within
    flipped = _group(_record(judge=(-0.5, -0.7, -0.3), realism=(-1.1, -1.2, -0.6)),
                     _record(judge=(-0.5, -0.7, -0.3), realism=(-0.95, -1.2, -0.6)), method="flipped")
    assert ablation.verdict(_group(_record()), flipped) == "no: realism gain +1 within the flipped run"


def test_verdict_needs_every_seeds_interval_above_zero():
    # realism lower-is-better: an interval reaching above 0 is not a gain
    unsure = _record(realism=(-1.0, -1.5, 0.1))
    assert ablation.verdict(_group(_record(), unsure), FLIPPED) == "no: realism interval not above 0 (seed 1)"
    assert ablation.verdict(_group(_record(judge=(0.4, -0.01, 0.8)), _record()), FLIPPED) == (
        "no: judge interval not above 0 (seed 0)")
    worse = _record(realism=(-1.0, 0.2, 0.5))  # the interval is on the wrong side: worse, not better
    assert "realism interval not above 0 (seed 0)" in ablation.verdict(_group(worse), FLIPPED)


def test_verdict_bars_psnr_overall_and_per_task():
    assert ablation.verdict(_group(_record(psnr_loss=0.12), _record(psnr_loss=0.1)), FLIPPED) == (
        "no: PSNR -0.11 dB overall")
    assert ablation.verdict(_group(_record(task_loss=0.35), _record(task_loss=0.3)), FLIPPED) == (
        "no: PSNR -0.33 dB on jpeg")
    no_judge = _record()
    no_judge["vs_sft"]["rl"].pop("judge")
    assert ablation.verdict(_group(no_judge), FLIPPED) == "no: no judge figures"


def test_report_states_the_bar_and_holds_every_table(tmp_path):
    runs = _runs(tmp_path)
    text = ablation.report(runs)
    assert "at most 0.1 dB below SFT overall and at most 0.3 dB on every task" in text
    for table in (ablation.results_table(runs), ablation.intervals_table(runs), ablation.task_table(runs),
                  ablation.efficiency_table(runs)):
        assert table and table in text
    assert ablation.REALISM == scoring.REALISM


def test_read_runs_takes_the_per_task_detail_from_the_experiment_commit(monkeypatch):
    headline = {"n_test": 2, "overall": {"sft": {"psnr": 30.0}, "rl": {"psnr": 30.1}},
                "rl_vs_sft": {"psnr": {"diff": 0.1, "verdict": "better"}}}
    detail = {"n_test": 2, "overall": {"sft": {"psnr": 30.0}, "rl": {"psnr": 30.1}, "sft_blur": {"psnr": 29.0}},
              "per_task": {"jpeg": {"n": 2}}, "vs_sft": {"rl": {"psnr": _iv(0.1, 0.05, 0.15)}}}
    data = {"params": {"params.yaml": {"data": {"rl": {"images_per_epoch": 4, "group_size": 2}}}},
            "metrics": {"metrics/rl.json": {"data": {"seconds": 1.0}}, "metrics/evaluate.json": {"data": headline}}}
    shown = [{"rev": "base", "data": data, "experiments": [{"revs": [{"rev": "e1", "name": "ddpo-s0", "data": data}]}]}]
    asked = []

    def git(*args, check=True):
        asked.append(args)
        if args == ("rev-parse", "HEAD"):
            return subprocess.CompletedProcess(args, 0, "base\n", "")
        files = {"e1:plots/rl_curves.csv": "epoch,val_reward\n1,0.5\n", "e1:metrics/evaluate_detail.json": json.dumps(detail)}
        return subprocess.CompletedProcess(args, 0 if args[1] in files else 128, files.get(args[1], ""), "")

    monkeypatch.setattr(ablation, "git", git)
    monkeypatch.setattr(ablation, "dvc", lambda *a: subprocess.CompletedProcess(a, 0, json.dumps(shown), ""))
    [run] = ablation.read_runs([("ddpo", 0, "ddpo-s0")])
    assert ("show", "e1:metrics/evaluate_detail.json") in [a[:2] for a in asked]
    assert run.evaluate == detail and run.curves == [{"epoch": 1.0, "val_reward": 0.5}]
    shown[0]["experiments"][0]["revs"][0]["rev"] = "e2"  # a commit without the detail file
    with pytest.raises(ablation.AblationError, match="no metrics/evaluate_detail.json in its commit"):
        ablation.read_runs([("ddpo", 0, "ddpo-s0")])


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
