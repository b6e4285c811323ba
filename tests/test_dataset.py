"""Training pairs streamed from disk: the draws (patch, flip/rotation, crop) are made apart from
the reading, so batches do not depend on DataLoader workers, processes or a resume."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.dataset import PatchPairs, TrainingDraws, dihedral, load_split, sample_weights, task_weights
from pipeline.paths import Paths


def _batches(pairs, draws, workers=0):
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=draws, num_workers=workers)
    return [(b["gt"], b["lq"], b["row"]) for b in loader]


def test_streamed_pairs_are_the_loaded_split(prepared_smoke):
    data = Paths(prepared_smoke).data
    whole, pairs = load_split(data, "train"), PatchPairs(data, "train")
    assert len(pairs) == len(whole) and pairs.tasks == whole.tasks
    item = pairs[5]
    assert torch.equal(item["gt"], whole.gt[5]) and torch.equal(item["lq"], whole.lq[5]) and item["row"] == 5
    assert torch.equal(task_weights("task_balanced", pairs), sample_weights("task_balanced", whole))


def test_batches_are_the_same_for_any_number_of_workers(prepared_smoke):
    pairs = PatchPairs(Paths(prepared_smoke).data, "train")
    draws = TrainingDraws(len(pairs), 6, 5, seed=3, augment=True, patch=32)
    alone, workers = _batches(pairs, draws), _batches(pairs, draws, workers=2)
    assert len(alone) == 5
    for (gt_a, lq_a, row_a), (gt_w, lq_w, row_w) in zip(alone, workers):
        assert torch.equal(gt_a, gt_w) and torch.equal(lq_a, lq_w) and torch.equal(row_a, row_w)


def test_the_ranks_rows_make_up_the_global_batch_and_a_resume_replays_the_draws():
    def keys(**kw):
        return list(TrainingDraws(50, 8, 6, seed=1, augment=True, patch=32, crop=16, **kw))

    full = keys()
    halves = zip(keys(rows=slice(0, 4)), keys(rows=slice(4, 8)))
    assert [a + b for a, b in halves] == full
    assert keys(start=4) == full[4:]
    assert {k[1] for batch in full for k in batch} <= set(range(8))
    assert all(0 <= k[2] <= 16 and 0 <= k[3] <= 16 for batch in full for k in batch)
    assert any(k[1] for batch in full for k in batch), "augment draws flips/rotations"
    plain = list(TrainingDraws(50, 8, 2, seed=1, augment=False, patch=32))
    assert all(k[1:] == (0, 0, 0) for batch in plain for k in batch)


@pytest.mark.parametrize("code", range(8))
def test_gt_and_lq_get_the_same_transform_and_crop(prepared_smoke, code):
    pairs = PatchPairs(Paths(prepared_smoke).data, "train", crop=16)
    gt, lq = pairs.pair(2)
    item = pairs[(2, code, 8, 4)]
    assert torch.equal(item["gt"], dihedral(gt[:, 8:24, 4:20], code))
    assert torch.equal(item["lq"], dihedral(lq[:, 8:24, 4:20], code))
    transforms = {tuple(dihedral(torch.arange(4.0).view(1, 2, 2), c).flatten().tolist()) for c in range(8)}
    assert len(transforms) == 8, "the 8 codes are the 8 symmetries of the square"


def test_a_smaller_lq_is_cropped_at_its_own_scale():
    import tempfile
    from pathlib import Path

    from pipeline.stages import prepare
    from tests.conftest import smoke_params

    with tempfile.TemporaryDirectory() as tmp:
        prepare.run(smoke_params(prepare={"lq_scale": 2}), Path(tmp))
        pairs = PatchPairs(Path(tmp) / "data" / "prepared", "train", crop=16)
        gt, lq = pairs.pair(0)
        item = pairs[(0, 0, 8, 4)]
        assert item["gt"].shape[-1] == 16 and item["lq"].shape[-1] == 8
        assert torch.equal(item["lq"], lq[:, 4:12, 2:10])


def test_sft_ends_with_the_same_weights_with_loader_workers(workspace, tmp_path_factory, monkeypatch):
    """`runtime.loader_workers` changes who reads the pairs, never which pairs are trained on."""
    import shutil

    from safetensors.torch import load_file

    from pipeline.stages import sft
    from tests.conftest import smoke_params

    weights = []
    for workers in (0, 2):
        root = tmp_path_factory.mktemp(f"workers{workers}")
        shutil.copytree(workspace / "data", root / "data")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        sft.run(smoke_params(runtime={"loader_workers": workers}, sft={"crop_size": 16}), root)
        weights.append(load_file(root / "checkpoints/sft/unet/diffusion_pytorch_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_bundled_images_load_as_rgb_including_a_stereo_pair():
    """skimage's stereo_motorcycle returns (left, right, disparity): its left view is the image;
    a grey image is repeated into three channels."""
    import skimage.data

    from pipeline.data.sources import load_skimage

    motorcycle, cell = load_skimage(["stereo_motorcycle", "cell"])
    assert motorcycle.gt.shape == (500, 741, 3) and (motorcycle.gt == skimage.data.stereo_motorcycle()[0]).all()
    assert cell.gt.shape == (660, 550, 3) and (cell.gt[..., 2] == skimage.data.cell()).all()
