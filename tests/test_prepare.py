import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.data.patches import task_counts
from pipeline.data.sources import DataError
from pipeline.stages import prepare
from tests.conftest import smoke_params


def _files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


def test_split_is_by_source_and_manifest_matches_files(prepared_smoke):
    data = prepared_smoke / "data" / "prepared"
    manifest = json.loads((data / "manifest.json").read_text())
    sources = {split: {s["source"] for s in manifest["samples"] if s["split"] == split}
               for split in ("train", "val", "test")}
    assert sources["test"] == {"chelsea"} and sources["val"] == {"coffee"}
    assert not (sources["train"] & sources["test"]) and not (sources["train"] & sources["val"])
    for s in manifest["samples"]:
        gt = np.asarray(Image.open(data / s["gt"]))
        assert gt.shape == (32, 32, 3)
        assert hashlib.sha256(gt.tobytes()).hexdigest() == s["sha256_gt"]
        assert s["task"] == s["degradations"][0]["name"]
        # no flat crop (rocket, a training image, is half sky)
        assert (gt.mean(axis=2) / 255).std() >= smoke_params().prepare.min_patch_std > 0, s["id"]


def test_prepare_is_reproducible(tmp_path, prepared_smoke):
    prepare.run(smoke_params(), tmp_path)
    a = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    b = json.loads((prepared_smoke / "data/prepared/manifest.json").read_text())
    assert a == b


def test_mix_prob_chains_two_different_tasks(tmp_path):
    params = smoke_params(prepare={"degradations": {"mix_prob": 1.0}})
    prepare.run(params, tmp_path)
    samples = json.loads((tmp_path / "data/prepared/manifest.json").read_text())["samples"]
    for s in samples:
        names = [d["name"] for d in s["degradations"]]
        assert len(names) == 2 and names[0] != names[1]


def _save(path, size=(48, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)


def _folder_params(kind, path):
    return smoke_params(prepare={"source": {"kind": kind, "path": str(path)}, "split": {"val": [], "test": []}})


def test_folder_source(tmp_path):
    for name in "abcd":
        _save(tmp_path / "imgs" / f"{name}.png")
    counts = prepare.run(_folder_params("folder", tmp_path / "imgs"), tmp_path / "ws")
    assert counts["train"] > 0 and counts["val"] > 0 and counts["test"] > 0


def test_pairs_source_keeps_given_lq(tmp_path):
    for name in "abc":
        _save(tmp_path / "pairs/gt" / f"{name}.png")
        _save(tmp_path / "pairs/lq" / f"{name}.png")
    prepare.run(_folder_params("pairs", tmp_path / "pairs"), tmp_path / "ws")
    samples = json.loads((tmp_path / "ws/data/prepared/manifest.json").read_text())["samples"]
    assert {s["task"] for s in samples} == {"pairs"}


def _assert_fails_cleanly(params, root, match):
    """The error names the culprit; no output and no temp dir are left behind."""
    with pytest.raises(DataError, match=match):
        prepare.run(params, root)
    data_parent = root / "data"
    assert not data_parent.exists() or _files_under(data_parent) == []


def test_corrupt_image_is_named(tmp_path):
    for name in "abc":
        _save(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    _assert_fails_cleanly(_folder_params("folder", tmp_path / "imgs"), tmp_path / "ws", r"broken\.jpg: cannot read image")


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "imgs").mkdir()
    _assert_fails_cleanly(_folder_params("folder", tmp_path / "imgs"), tmp_path / "ws", r"imgs: no images found")


def test_pair_size_mismatch_is_named(tmp_path):
    for name in "abc":
        _save(tmp_path / "pairs/gt" / f"{name}.png")
        _save(tmp_path / "pairs/lq" / f"{name}.png", size=(48, 40) if name == "b" else (48, 48))
    _assert_fails_cleanly(_folder_params("pairs", tmp_path / "pairs"), tmp_path / "ws",
                          r"lq/b\.png: size 48x40 does not match .*gt/b\.png")


def test_pair_without_counterpart_is_named(tmp_path):
    for name in "abc":
        _save(tmp_path / "pairs/gt" / f"{name}.png")
        if name != "c":
            _save(tmp_path / "pairs/lq" / f"{name}.png")
    _assert_fails_cleanly(_folder_params("pairs", tmp_path / "pairs"), tmp_path / "ws", r"gt/c\.png: has no counterpart")


def test_failure_midway_keeps_previous_output(tmp_path, monkeypatch):
    """A stage dying after it has written some patches must leave the old data untouched."""
    prepare.run(smoke_params(), tmp_path)
    before = (tmp_path / "data/prepared/manifest.json").read_text()
    calls = {"n": 0}
    real = prepare.cut_samples

    def dies_on_second_image(*args, **kwargs):
        # Fault injection: a crash mid-write cannot be caused deterministically otherwise.
        calls["n"] += 1
        if calls["n"] == 2:
            raise DataError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "cut_samples", dies_on_second_image)
    with pytest.raises(DataError, match="injected"):
        prepare.run(smoke_params(prepare={"patch_size": 16}), tmp_path)
    assert (tmp_path / "data/prepared/manifest.json").read_text() == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["prepared"]


def test_too_few_images_and_unknown_split_name(tmp_path):
    _assert_fails_cleanly(smoke_params(prepare={"source": {"images": ["astronaut", "rocket"]}, "split": {"val": [], "test": []}}),
                          tmp_path, "need at least 3")
    _assert_fails_cleanly(smoke_params(prepare={"split": {"test": ["moon"]}}), tmp_path,
                          r"prepare\.split\.test: \['moon'\] not among")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path, suffix):
    """A near-white 16-bit image (60000 of 65535) is 233 of 255, not the clipped 255."""
    from PIL import Image

    from pipeline.data.sources import read_image

    values = np.array([[0, 257, 30000, 60000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / f"grey16{suffix}")
    rgb = read_image(tmp_path / f"grey16{suffix}")
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 117, 233, 255] and (rgb[..., 0] == rgb[..., 2]).all()


def test_transparent_pixels_are_composited_over_white(tmp_path):
    from PIL import Image

    from pipeline.data.sources import read_image

    rgba = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [200, 100, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = read_image(tmp_path / "alpha.png")
    a = 128 / 255
    half = [round(200 * a + 255 * (1 - a)), round(100 * a + 255 * (1 - a)), round(255 * (1 - a))]
    assert rgb.tolist() == [[[255, 255, 255], [0, 0, 0], half]]


def test_lq_scale_writes_each_lq_as_the_block_mean_of_the_full_size_one(tmp_path, prepared_smoke):
    from pipeline.data.dataset import read_manifest

    prepare.run(smoke_params(prepare={"lq_scale": 2}), tmp_path)
    small, full = read_manifest(tmp_path / "data/prepared"), read_manifest(prepared_smoke / "data/prepared")
    assert [s["id"] for s in small["samples"]] == [s["id"] for s in full["samples"]]
    for s, f in zip(small["samples"][:10], full["samples"][:10]):
        lq = np.asarray(Image.open(tmp_path / "data/prepared" / s["lq"]), dtype=np.float64)
        ref = np.asarray(Image.open(prepared_smoke / "data/prepared" / f["lq"]), dtype=np.float64)
        assert lq.shape == (16, 16, 3) and s["gt"] == f["gt"]
        blocks = ref.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
        assert np.abs(lq - blocks).max() <= 0.5
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="lq_scale 3 does not divide patch_size 32"):
        smoke_params(prepare={"lq_scale": 3})


def test_every_split_holds_every_task_in_proportion(prepared_smoke):
    """Tasks are stratified per split: equal weights give each split's tasks counts that differ
    by at most one, so val and test never hold a task train lacks."""
    samples = json.loads((prepared_smoke / "data/prepared/manifest.json").read_text())["samples"]
    tasks = set(smoke_params().prepare.degradations.tasks)
    for split in ("train", "val", "test"):
        counts = Counter(s["task"] for s in samples if s["split"] == split)
        if sum(counts.values()) >= len(tasks):
            assert set(counts) == tasks, split
        assert max(counts.values()) - min(counts.values()) <= 1, (split, counts)
        if split != "train":
            assert set(counts) <= {s["task"] for s in samples if s["split"] == "train"}


def test_task_counts_follow_the_weights():
    rng = np.random.default_rng(0)
    assert task_counts(10, {"a": 1, "b": 4}, rng) == {"a": 2, "b": 8}
    # Each task gets a patch when there are enough; the minimum comes out of the largest share.
    assert task_counts(3, {"a": 100, "b": 1, "c": 1}, rng) == {"a": 1, "b": 1, "c": 1}
    few = task_counts(2, {t: 1 for t in "abcdefg"}, rng)
    assert sum(few.values()) == 2 and set(few.values()) == {0, 1}


def test_a_task_val_has_and_train_lacks_is_one_error_naming_both(tmp_path):
    """2 training patches cannot hold the 7 tasks that val's 7 patches hold: the restorer would
    meet unknown tasks in reward, rl and evaluate."""
    params = smoke_params(prepare={"patches_per_image": {"train": 1, "val": 7, "test": 1}})
    _assert_fails_cleanly(params, tmp_path, r"task '\w+' is in the val split but not in train .*"
                                            r"prepare.patches_per_image.train")


def test_default_val_and_test_hold_several_images_and_every_task():
    """The shipped split: val (RL's epoch choice, the reward's checks) and test each hold three
    source images, and each task has at least 6 patches in val and 20 in test, spread over more
    than one image; nothing here reads pixels (names and the seeded task schedule only)."""
    params = prepare.Params()
    cfg, seed = params.prepare, params.runtime.seed
    splits = prepare.split_by_source(cfg.source.images, cfg, seed)
    schedule = prepare.task_schedule(splits, cfg, seed)
    tasks = set(cfg.degradations.tasks)
    for split, least in (("val", 6), ("test", 20)):
        images = [n for n, s in splits.items() if s == split]
        assert len(images) >= 3, (split, images)
        counts = Counter(t for n in images for t in schedule[n])
        assert set(counts) == tasks and min(counts.values()) >= least, (split, counts)
        for task in tasks:
            assert sum(task in schedule[n] for n in images) >= 2, (split, task)


def test_flat_crops_are_drawn_again_and_a_flat_image_still_gives_its_patches():
    """With min_patch_std, no crop of an image half flat, half textured comes from the flat half
    (without it, about half do); an image flat everywhere still gives its patches (the most
    textured of the draws) instead of looping."""
    from pipeline.config import PrepareConfig
    from pipeline.data.patches import cut_patches
    from pipeline.data.sources import SourceImage

    rng = np.random.default_rng(0)
    gt = np.full((96, 192, 3), 128, np.uint8)
    gt[:, 96:] = rng.integers(0, 256, (96, 96, 3))  # the right half textured
    image, cfg = SourceImage("half", gt), PrepareConfig()

    def crops(min_std, img=image):
        return [p.crop for p in cut_patches(img, np.random.default_rng(1), 40, 32, 1, cfg.degradations,
                                            ["jpeg"] * 40, min_std)]

    flat = [x for _, x in crops(0.02) if x + 32 <= 96]
    assert not flat
    assert sum(x + 32 <= 96 for _, x in crops(0.0)) >= 5
    blank = SourceImage("blank", np.full((64, 64, 3), 7, np.uint8))
    assert len(crops(0.02, blank)) == 40
