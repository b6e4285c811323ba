"""`evaluate`'s judgement of a row against SFT (paired bootstrap) and its labelled image grid."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import evaluate_record, scoring
from pipeline.data.dataset import load_split
from pipeline.stages import evaluate
from tests.conftest import smoke_params


def test_the_interval_is_paired_and_read_in_the_metrics_direction():
    g = torch.Generator().manual_seed(0)
    sft = torch.linspace(20, 40, 64)  # patches differ a lot from each other...
    better = sft + 0.1 + 0.01 * torch.randn(64, generator=g)  # ...the row beats SFT on each one
    interval = scoring.paired_interval(better, sft, g)
    assert 0.09 < interval["lo"] < interval["diff"] < interval["hi"] < 0.11
    assert evaluate_record.verdict(interval, higher_is_better=True) == "better"
    assert evaluate_record.verdict(interval, higher_is_better=False) == "worse"  # e.g. GMSD, lower is better
    # Unpaired, the spread of the patches would hide a 0.1 gain; zero-mean noise is unclear.
    noise = sft + torch.randn(64, generator=g)
    assert evaluate_record.verdict(scoring.paired_interval(noise - (noise - sft).mean(), sft, g), True) == "unclear"
    assert scoring.paired_interval(sft + 2, sft, g) == {"diff": 2.0, "lo": 2.0, "hi": 2.0}


def test_every_row_but_lq_sft_and_gt_is_judged_against_sft(prepared_smoke):
    test = load_split(prepared_smoke / "data/prepared", "test")
    sft = (test.lq_full + test.gt) / 2
    outputs = {"lq": test.lq_full, "sft": sft, "rl": sft + 0.02, "sft_blur": sft * 0.9}
    metrics = scoring.score_outputs(outputs, test, ["psnr", "gmsd"], ["piqe"])
    assert set(metrics["vs_sft"]) == {"rl", "sft_blur"}
    assert set(metrics["vs_sft"]["rl"]) == {"psnr", "gmsd", "piqe", "realism"}
    assert metrics["higher_is_better"]["realism"] is False and "realism" in metrics["overall"]["sft_blur"]
    mean_gap = metrics["overall"]["rl"]["psnr"] - metrics["overall"]["sft"]["psnr"]
    assert metrics["vs_sft"]["rl"]["psnr"]["diff"] == pytest.approx(mean_gap, abs=2e-4)
    table = evaluate_record.format_table(metrics)
    assert "  rl            psnr " in table and " worse;" in table
    assert metrics["higher_is_better"]["gmsd"] is False


def test_the_share_of_patches_a_judge_ranks_gt_above_sft_reads_its_direction():
    """Per no-reference metric, overall and per task; PIQE is lower-is-better. The table names
    the tasks under one half."""
    per_image = {"gt": {"judge": torch.tensor([3.0, 1, 2, 2]), "piqe": torch.tensor([10.0, 50, 50, 50])},
                 "sft": {"judge": torch.tensor([1.0, 2, 1, 1]), "piqe": torch.tensor([20.0, 20, 20, 20])}}
    rates = scoring.gt_above_sft(per_image, np.array(["a", "a", "b", "b"]), {"judge": True, "piqe": False})
    assert rates == {"judge": {"overall": 0.75, "a": 0.5, "b": 1.0}, "piqe": {"overall": 0.25, "a": 0.5, "b": 0.0}}
    table = evaluate_record.format_table({"higher_is_better": {}, "n_test": 4, "overall": {}, "gt_above_sft": rates})
    assert "  judge         overall 0.75\n" in table + "\n" and "piqe          overall 0.25;  under 0.5: b 0.00" in table


def test_evaluate_reports_how_often_each_judge_ranks_gt_above_sft(prepared_smoke):
    test = load_split(prepared_smoke / "data/prepared", "test")
    sft = (test.lq_full + test.gt) / 2
    metrics = scoring.score_outputs({"lq": test.lq_full, "sft": sft, "rl": sft}, test, ["psnr"], ["piqe"])
    tasks = sorted(set(test.tasks))
    assert set(metrics["gt_above_sft"]) == {"piqe"} and list(metrics["gt_above_sft"]["piqe"]) == ["overall", *tasks]
    assert 0 <= metrics["gt_above_sft"]["piqe"]["overall"] <= 1
    assert "gt_above_sft" in evaluate.split_headline(metrics)[1]


@pytest.fixture(scope="module")
def bigger_test_split(tmp_path_factory):
    """The smoke images with 64 test patches (about 9 per task)."""
    from pipeline.stages import prepare

    root = tmp_path_factory.mktemp("bigger_test")
    prepare.run(smoke_params(prepare={"patches_per_image": {"train": 12, "val": 4, "test": 64}}), root)
    return load_split(root / "data/prepared", "test")


def test_realism_orders_the_controls_and_sees_noise_the_paired_metrics_average_away(bigger_test_split):
    """GT is 0 from itself; a 1/255 dither and a 5 % contrast are nearly GT, a blur and the LQ
    far from it; and the interval (halves of each task's patches) is paired with SFT's."""
    from pipeline.rewards.hacks import HACKS
    from pipeline.rewards.realism import Realism

    test = bigger_test_split
    realism, g = Realism(test.gt, test.tasks), torch.Generator().manual_seed(0)
    distance = {name: realism.distance(hack(test.gt, g)) for name, hack in HACKS.items()}
    assert realism.distance(test.gt) == 0.0
    assert max(distance["dither"], distance["contrast"]) < 1 < distance["unsharp"] < distance["blur"]
    # The LQ mixes blurred, noisy and dark patches: pooled over tasks that mixture spreads like
    # GT's and would look closer than a 3x3 blur; per task it is the furthest of all.
    assert realism.distance(test.lq_full) > distance["blur"]
    # Noise of 4 grey levels: PSNR-wise small (about 36 dB), as a distribution plainly not GT.
    noisy = (test.gt + 0.03 * torch.randn(test.gt.shape, generator=g)).clamp(-1, 1)
    interval = realism.interval(noisy, test.gt, g, resamples=300)
    assert interval["lo"] > 0 and evaluate_record.verdict(interval, higher_is_better=False) == "worse"
    # Paired: the same images as SFT differ by exactly 0 on every half.
    assert realism.interval(noisy, noisy, g, resamples=50) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}


def test_an_invisible_dither_hardly_moves_realism_on_flat_images(tmp_path):
    """On `coins` and `cell` (grey photo, flat microscopy: much of them within a few grey levels)
    a 1/255 dither, which nobody can see, moves GT's realism by under a tenth of what a 3x3 blur
    does: the measure's floors (DETAIL_FLOOR, the first gradient bin) keep sub-grey-level
    changes from counting. Without them it moved it by about a quarter of the blur here."""
    from pipeline.rewards.hacks import HACKS
    from pipeline.rewards.realism import Realism
    from pipeline.stages import prepare

    prepare.run(smoke_params(prepare={"source": {"images": ["astronaut", "coffee", "coins", "cell"]},
                                      "split": {"val": ["coffee"], "test": ["coins", "cell"]},
                                      "patches_per_image": {"train": 8, "val": 4, "test": 32}}), tmp_path)
    flat = load_split(tmp_path / "data/prepared", "test")
    realism, g = Realism(flat.gt, flat.tasks), torch.Generator().manual_seed(0)
    dither, blur = (realism.distance(HACKS[name](flat.gt, g)) for name in ("dither", "blur"))
    assert 0 < dither < blur / 10, (dither, blur)


def test_the_realism_interval_sums_each_drawn_half_as_the_distance_does(bigger_test_split):
    """`interval` sums all halves at once; each half's figure is the distance on that half
    (the MMD^2 definition in `Realism._distance`), row minus SFT, over the same draws."""
    from pipeline.rewards.realism import Realism, kernels

    test = bigger_test_split
    realism, g = Realism(test.gt, test.tasks), torch.Generator().manual_seed(3)
    sft = (test.gt + 0.02 * torch.randn(test.gt.shape, generator=g)).clamp(-1, 1)
    row = (0.9 * test.gt + 0.1 * test.lq_full).clamp(-1, 1)
    interval = realism.interval(row, sft, torch.Generator().manual_seed(7), resamples=200)

    draws = torch.Generator().manual_seed(7)  # the halves again, in the order interval draws them
    k_row, k_sft = (kernels(realism.features(x), realism.gt, realism.width) for x in (row, sft))
    diffs = []
    for _ in range(200):
        halves = [grp[torch.randperm(len(grp), generator=draws)[:max(2, len(grp) // 2)]] for grp in realism.groups]
        diffs.append(realism._distance(k_row, halves) - realism._distance(k_sft, halves))
    lo, hi = torch.quantile(torch.tensor(diffs, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    assert interval["diff"] == round(realism.distance(row) - realism.distance(sft), 4)
    assert (interval["lo"], interval["hi"]) == pytest.approx((float(lo), float(hi)), abs=1e-4)
    assert interval["hi"] - interval["lo"] > 0.01, "the halves differ, so the interval has a width"


def test_the_statistic_groups_name_every_realism_column_once():
    """bench/realism_controls.py scores each group alone: together they are all the statistics."""
    from pipeline.rewards.realism import STATISTIC_GROUPS, statistics

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    columns = sorted(i for group in STATISTIC_GROUPS.values() for i in group)
    assert columns == list(range(statistics(images).shape[1]))


def test_the_grid_names_its_columns_and_rows(prepared_smoke, tmp_path):
    test = load_split(prepared_smoke / "data/prepared", "test")
    rows = evaluate.grid_rows(test.tasks, 3)
    assert len(set(test.tasks[i] for i in rows)) == 3, "one row per task in turn"
    columns = {"lq": test.lq_full[rows], "sft": test.gt[rows].clone(), "rl": test.gt[rows].clone(), "gt": test.gt[rows]}
    evaluate.save_grid(tmp_path / "grid.png", columns, [test.tasks[i] for i in rows])
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("L"))
    cell = 32 * 4
    label_w = grid.shape[1] - 4 * cell
    assert grid.shape[0] == evaluate.GRID_MARGIN + 3 * cell and label_w > 40
    assert (grid[:evaluate.GRID_MARGIN, label_w:] < 100).any(), "column names on top"
    assert (grid[evaluate.GRID_MARGIN:, :label_w] < 100).any(), "task names on the left"
    # The GT column is the GT itself, untouched by labels.
    gt = ((test.gt[rows[0]].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    first_gt = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))[
        evaluate.GRID_MARGIN:evaluate.GRID_MARGIN + cell, label_w + 3 * cell:][::4, ::4]
    assert np.array_equal(first_gt, gt)  # the first row is the first picked patch


# ---------------------------------------------------------------------------------------------
# benchmark folders (evaluate.benchmarks)


def _folder_of_images(folder, names=("astronaut", "rocket")):
    import skimage.data

    folder.mkdir(parents=True)
    for name in names:
        Image.fromarray(np.asarray(getattr(skimage.data, name)())[:80, :96]).save(folder / f"{name}.png")
    return folder


@pytest.fixture
def identity_models(workspace):
    """checkpoints/sft: a task-conditioned restorer that returns its LQ (a zero output layer)."""
    from pipeline.models.restorer import PixelRestorer
    from tests.conftest import smoke_params

    model = PixelRestorer.build(smoke_params().model, list(smoke_params().prepare.degradations.tasks))
    model.save_pretrained(workspace / "checkpoints/sft")
    return workspace


def test_benchmark_folders_are_scored_beside_the_test_split(identity_models, tmp_path, monkeypatch):
    """An HQ folder is cut and degraded as prepare does (tasks stratified); a folder of ready
    pairs is taken as it is, under the task it names. Each is a block of evaluate.json."""
    from pipeline.data.benchmarks import load_benchmark
    from tests.conftest import smoke_params

    root = identity_models
    hq = _folder_of_images(tmp_path / "hq")
    pairs = tmp_path / "pairs"
    _folder_of_images(pairs / "gt", ["coins"]), _folder_of_images(pairs / "lq", ["coins"])
    benchmarks = {"photos": {"path": str(hq), "patches_per_image": 7},
                  "mine": {"path": str(pairs), "patches_per_image": 3, "task": "jpeg"}}
    params = smoke_params(evaluate={"benchmarks": benchmarks})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    metrics = evaluate.run(params, root)

    photos = load_benchmark("photos", params.evaluate.benchmarks["photos"], params.prepare, 0)
    assert len(photos) == 14 and len(set(photos.tasks)) == 7  # 14 patches share the 7 tasks
    block = metrics["benchmarks"]["photos"]
    assert block["n_test"] == 14 and set(block["per_task"]) == set(photos.tasks)
    # The identity restorer returns the LQ: its PSNR is the LQ's, on the benchmark's own patches.
    assert block["overall"]["sft"]["psnr"] == pytest.approx(block["overall"]["lq"]["psnr"], abs=1e-3)
    mine = metrics["benchmarks"]["mine"]
    assert mine["n_test"] == 3 and list(mine["per_task"]) == ["jpeg"]
    assert mine["overall"]["lq"]["psnr"] > 60  # gt/ and lq/ are the same images here
    headline = json.loads((root / "metrics/evaluate.json").read_text())
    detail = json.loads((root / "metrics/evaluate_detail.json").read_text())
    assert set(headline["benchmarks"]["photos"]["overall"]) == {"sft"}  # no RL checkpoint here
    controls = {"sft_dither", "sft_unsharp", "sft_blur", "sft_contrast"}  # read against the same controls
    assert set(detail["benchmarks"]["photos"]["overall"]) == {"lq", "sft", "gt"} | controls
    assert set(detail["benchmarks"]["photos"]["vs_sft"]) == controls
    assert block["vs_sft"]["sft_dither"]["psnr"]["hi"] < 0  # added noise: worse than SFT with confidence
    assert "per_task" not in headline["benchmarks"]["photos"] and "photos" in detail["benchmarks"]
    assert headline["benchmarks"]["photos"]["path"] == str(hq)
    assert "Benchmark 'photos'" in evaluate_record.format_table(evaluate_record.merge(headline, detail))

    # Ready pairs without a task name: one error naming the key, not a traceback from the model.
    unnamed = smoke_params(evaluate={"benchmarks": {"mine": {"path": str(pairs), "patches_per_image": 3}}})
    with pytest.raises(evaluate.DataError, match=r"evaluate.benchmarks.mine: task\(s\) \['pairs'\] unknown to the "
                                                 r"restorer.*set evaluate.benchmarks.mine.task"):
        evaluate.run(unnamed, root)
    # A task name on a folder of HQ images (degraded with every task) is refused, not ignored.
    named = smoke_params(evaluate={"benchmarks": {"photos": {"path": str(hq), "task": "jpeg"}}})
    with pytest.raises(evaluate.DataError, match=r"evaluate.benchmarks.photos.task: .*hq holds HQ images"):
        evaluate.run(named, root)


def test_the_headline_keeps_sft_rl_and_their_difference_and_the_detail_everything(prepared_smoke):
    test = load_split(prepared_smoke / "data/prepared", "test")
    sft = (test.lq_full + test.gt) / 2
    metrics = scoring.score_outputs({"lq": test.lq_full, "sft": sft, "rl": sft + 0.01, "sft_blur": sft * 0.9},
                                     test, ["psnr", "ssim"], ["piqe"])
    headline, detail = evaluate.split_headline(metrics)
    assert set(headline) == {"n_test", "overall", "rl_vs_sft"}
    assert headline["overall"] == {row: metrics["overall"][row] for row in ("sft", "rl")}
    rl = metrics["vs_sft"]["rl"]
    assert headline["rl_vs_sft"]["ssim"] == {"diff": rl["ssim"]["diff"]}
    for m in ("psnr", "realism"):  # a verdict only for the metrics the bar of "RL improves" reads
        assert headline["rl_vs_sft"][m] == {"diff": rl[m]["diff"],
                                            "verdict": evaluate_record.verdict(rl[m], metrics["higher_is_better"][m])}
    assert headline["rl_vs_sft"]["psnr"]["verdict"] == "worse"  # +0.01 everywhere: off the GT
    figures = [v for v in _leaves(headline)]
    assert len(figures) == 1 + 2 * 4 + 4 + 2  # n_test, 2 rows x 4 metrics, 4 diffs, 2 verdicts
    assert detail == metrics and evaluate_record.merge(headline, detail) == metrics
    # per task: every compared row against SFT on the task's patches, realism where a task has enough
    task, rows = next(iter(metrics["per_task_vs_sft"].items()))
    assert set(rows) == {"rl", "sft_blur"} and set(rows["rl"]) >= {"psnr", "ssim", "piqe"}
    assert set(rows["rl"]["psnr"]) == {"diff", "lo", "hi"}
    mask = [t == task for t in test.tasks]
    gap = metrics["per_task"][task]["rl"]["psnr"] - metrics["per_task"][task]["sft"]["psnr"]
    assert rows["rl"]["psnr"]["diff"] == pytest.approx(gap, abs=2e-4) and sum(mask) == metrics["per_task"][task]["n"]


def _leaves(tree):
    for value in tree.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]


# ---------------------------------------------------------------------------------------------
# the test split streamed batch by batch


def test_streamed_evaluation_scores_the_restorations_every_stage_makes(tmp_path, prepared_smoke, monkeypatch):
    """evaluate reads the test split batch by batch (DataLoader) and restores each batch with its
    own generator: its figures are those of `restore_split` (what rl validates and promote
    restores) on the whole split, the grid shows those images, and DataLoader workers change
    nothing."""
    from pipeline.data.dataset import load_split
    from pipeline.models.loading import load_restorer
    from pipeline.models.sampling import restore_split
    from pipeline.paths import Paths
    from pipeline.stages import prepare
    from tests.conftest import scored_stand_ins

    prepare.run(smoke_params(prepare={"patches_per_image": {"train": 12, "val": 4, "test": 10}}), tmp_path / "data")
    root = scored_stand_ins(tmp_path / "ws", tmp_path / "data")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    # 10 test patches: batches of 4, 4 and 2; 9 grid rows: every task, then the first two again
    params = smoke_params(evaluate={"batch_size": 4, "grid_images": 9})
    streamed = evaluate.run(params, root)
    test = load_split(Paths(root).data, "test")
    whole = restore_split(load_restorer(Paths(root).sft_model), test, params)
    expected = scoring.score_outputs({"lq": test.lq_full, "sft": whole}, test, ["psnr"], [])
    assert streamed["overall"]["sft"]["psnr"] == expected["overall"]["sft"]["psnr"]
    assert streamed["overall"]["sft"]["realism"] == expected["overall"]["sft"]["realism"]
    assert streamed["n_test"] == len(test) == 10
    grid = np.asarray(Image.open(root / "plots/eval_grid.png").convert("RGB"))
    picks, cell = evaluate.grid_rows(test.tasks, params.evaluate.grid_images), 32 * 4
    assert picks != sorted(picks), "the grid shows the patches task by task, not in row order"
    label_w = grid.shape[1] - 3 * cell  # LQ | SFT | GT
    for r, row in enumerate(picks):
        top = evaluate.GRID_MARGIN + r * cell + 12  # below the PSNR label
        sft_cell = grid[top:top + cell - 12, label_w + cell:label_w + 2 * cell][::4, ::4]
        shown = ((whole[row].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(sft_cell, shown[3:]), f"grid row {r} shows patch {row}'s own restoration"
    written = (root / "metrics/evaluate.json").read_bytes()
    evaluate.run(smoke_params(evaluate={"batch_size": 4, "grid_images": 9}, runtime={"loader_workers": 2}), root)
    assert (root / "metrics/evaluate.json").read_bytes() == written
