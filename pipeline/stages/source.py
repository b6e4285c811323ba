"""`source`: a listing of the images `prepare` reads, in `data/source.json`.

DVC runs this stage on every `dvc repro` (`always_changed` in dvc.yaml) and `prepare` depends
on its output, so DVC itself decides: new, removed or changed source images change the listing
and re-run `prepare` and everything after it; an unchanged listing leaves them up to date.
The listing holds each image's name, size and checksum: the MD5 of a local file, the ETag of
an object under an `s3://` prefix (read from the listing, nothing is downloaded). For the
images bundled with scikit-image it holds their names and scikit-image's version.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic import atomic_file
from pipeline.config import Params
from pipeline.data.sources import IMAGE_SUFFIXES, DataError
from pipeline.paths import Paths
from pipeline.storage import endpoint_url, list_objects, split_s3_uri


def run(params: Params, root: Path = Path(".")) -> dict:
    source = params.prepare.source
    listing: dict = {"kind": source.kind}
    if source.kind in ("skimage", "faces"):
        import skimage

        listing |= {"images": source.images, "face_count": source.face_count, "skimage": skimage.__version__}
    elif source.path.startswith("s3://"):
        listing |= {"path": source.path, "files": _s3_files(source.path, endpoint_url(params.storage))}
    else:
        listing |= {"path": source.path, "files": _local_files(Path(source.path))}
    target = Paths(root).source_listing
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(listing, indent=1) + "\n")
    count = len(listing.get("files", listing.get("images", [])))
    print(f"source: {count} {source.kind} images listed in {target}")
    return listing


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _local_files(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise DataError(f"prepare.source.path: {folder} is not a directory")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p.name)):
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        files.append({"name": path.relative_to(folder).as_posix(), "size": path.stat().st_size,
                      "md5": digest.hexdigest()})
    return files


def _s3_files(uri: str, endpoint: str | None) -> list[dict]:
    _, prefix = split_s3_uri(uri)
    objects = sorted(list_objects(uri, endpoint), key=lambda o: o["Key"])
    return [{"name": o["Key"][len(prefix):].lstrip("/"), "size": o["Size"], "etag": o.get("ETag", "").strip('"')}
            for o in objects if _is_image(o["Key"])]
