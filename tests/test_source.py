"""The `source` stage: DVC re-runs `prepare` when the source images change, and only then.

The DVC test runs real `dvc repro` on the repository's dvc.yaml, with the images under an
s3:// prefix of a moto server (ETags from its listing)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.data.sources import DataError
from pipeline.stages import source
from tests.conftest import BIN, REPO, run_tool, smoke_params, smoke_raw, write_params
from tests.test_storage import _image_folder, _upload_images, creds, moto_fixture, s3  # noqa: F401  (fixtures)


def _listing(root):
    return json.loads((root / "data/source.json").read_text())


def test_a_changed_image_changes_the_listing_and_nothing_else_does(tmp_path):
    folder = _image_folder(tmp_path / "images")
    (folder / "notes.txt").write_text("not an image")
    params = smoke_params(prepare={"source": {"kind": "folder", "path": str(folder)}})
    source.run(params, tmp_path / "a")
    first = _listing(tmp_path / "a")
    assert [f["name"] for f in first["files"]] == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    (folder / "notes.txt").write_text("edited")
    source.run(params, tmp_path / "a")
    assert _listing(tmp_path / "a") == first, "a file prepare does not read changes nothing"
    shutil.copy(folder / "rocket.png", folder / "coffee.png")  # same name, other pixels
    source.run(params, tmp_path / "a")
    after = {f["name"]: f for f in _listing(tmp_path / "a")["files"]}
    before = {f["name"]: f for f in first["files"]}
    assert after.keys() == before.keys() and after["coffee.png"]["md5"] != before["coffee.png"]["md5"]
    assert all(after[n] == before[n] for n in before if n != "coffee.png")


def test_bundled_images_are_listed_by_name_and_version(tmp_path):
    import skimage

    source.run(smoke_params(), tmp_path)
    listing = _listing(tmp_path)
    assert listing["kind"] == "skimage" and listing["images"] == smoke_raw()["prepare"]["source"]["images"]
    assert listing["skimage"] == skimage.__version__


def test_a_missing_source_folder_is_named(tmp_path):
    params = smoke_params(prepare={"source": {"kind": "folder", "path": str(tmp_path / "nowhere")}})
    with pytest.raises(DataError, match=f"prepare.source.path: {tmp_path / 'nowhere'} is not a directory"):
        source.run(params, tmp_path)
    assert not (tmp_path / "data").exists()


def _bmp(path, offset: int) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    crop = skimage.data.moon()[offset:offset + 96, offset:offset + 128]
    Image.fromarray(np.repeat(crop[..., None], 3, axis=-1)).save(path)


def _ran(output: str) -> list[str]:
    return [s for s in ("source", "prepare") if f"Running stage '{s}'" in output]


@pytest.mark.e2e
def test_dvc_reruns_prepare_only_when_the_s3_images_change(moto, creds, tmp_path):  # noqa: F811
    folder = _image_folder(tmp_path / "images")
    _bmp(folder / "moon.bmp", offset=0)
    _upload_images(moto, "data", "src", folder)  # the PNGs
    s3(moto).upload_file(str(folder / "moon.bmp"), "data", "src/moon.bmp")
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    raw = smoke_raw()
    raw["prepare"]["source"] = {"kind": "folder", "path": "s3://data/src"}
    write_params(root, raw | {"storage": {"endpoint_url": creds}})
    run_tool(["git", "init", "-q"], root)
    run_tool([str(BIN / "dvc"), "init", "-q"], root)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))

    def repro():
        return _ran(run_tool([str(BIN / "dvc"), "repro", "prepare"], root).stdout)

    assert repro() == ["source", "prepare"]
    manifest = (root / "data/prepared/manifest.json").read_text()
    assert repro() == ["source"], "same images: prepare stays up to date"
    s3(moto).upload_file(str(folder / "rocket.png"), "data", "src/notes/readme.txt")  # not an image
    assert repro() == ["source"]
    # Other pixels, same name and byte size (uncompressed BMP): only the ETag tells.
    _bmp(tmp_path / "other.bmp", offset=200)
    assert (tmp_path / "other.bmp").stat().st_size == (folder / "moon.bmp").stat().st_size
    s3(moto).upload_file(str(tmp_path / "other.bmp"), "data", "src/moon.bmp")
    assert repro() == ["source", "prepare"], "a changed image re-runs prepare"
    assert (root / "data/prepared/manifest.json").read_text() != manifest
