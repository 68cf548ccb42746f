"""The packed dataset: its folder format, and its per-node cache for a version kept in object storage.

A packed dataset is a folder:
    manifest.json              written last; a folder without it is incomplete
    report.json                files left out and why, notes
    <split>_images.npy         (N, S, S, 3) uint8, S = stored_size
    <split>_labels.npy         (N,) int16 indices into manifest["class_names"]

A version in S3 (`<dest>/datasets/<name>/<version>/`, written by simpsons.prepare) holds the same
files plus the originals; `local_dataset_dir` fetches the packed files once per node. The sha256
of manifest.json (`manifest_sha256`) names the data a run trained on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from simpsons import storage
from simpsons.data import CLASS_NAMES, DataError, PackedSplit, class_counts
from simpsons.files import cache_key, file_sha256, node_lock, resumed_partial, sha256_hex, write_atomic
from simpsons.names import CACHE_DIR
from simpsons.storage import StorageError

_logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REPORT = "report.json"


# ---------------------------------------------------------------------------------------------
# The folder format


def write_packed(
    out_dir: str | Path,
    splits: dict[str, PackedSplit],
    stored_size: int,
    extra_manifest: dict | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
) -> dict:
    """Write arrays, report.json, then manifest.json last (its presence marks the set complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    manifest = {
        "format": 1,
        "class_names": list(class_names),
        "stored_size": stored_size,
        "splits": {},
        "sources": {},
        **(extra_manifest or {}),
    }
    for name, split in splits.items():
        np.save(out_dir / f"{name}_images.npy", split.images)
        np.save(out_dir / f"{name}_labels.npy", split.labels)
        manifest["splits"][name] = {
            "images": len(split.labels),
            "class_counts": class_counts(split.labels, len(class_names)),
            "files": {"images": f"{name}_images.npy", "labels": f"{name}_labels.npy"},
        }
        manifest["sources"].update(zip(split.sources, split.sha256))
    report = {"bad_files": {name: s.bad_files for name, s in splits.items()}}
    (out_dir / REPORT).write_text(json.dumps(report, indent=1))
    manifest["files"] = {p.name: file_sha256(p) for p in sorted(out_dir.iterdir()) if p.name != MANIFEST}
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _manifest_path(dataset_dir: str | Path) -> Path:
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{dataset_dir} has no {MANIFEST}: the dataset is missing or was not fully written; "
            "run jobs/prepare_data.py for it again."
        )
    return path


def read_manifest(dataset_dir: str | Path) -> dict:
    return json.loads(_manifest_path(dataset_dir).read_text())


def manifest_sha256(dataset_dir: str | Path) -> str:
    """sha256 (64 hex digits) of a packed dataset folder's manifest.json: names the exact data a run used.

    The manifest holds the sha256 of every packed file, so equal digests mean equal arrays. A
    node-local copy of an S3 version (local_dataset_dir) holds the manifest's bytes unchanged.
    """
    return sha256_hex(_manifest_path(dataset_dir).read_bytes())


def load_packed(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 3) uint8, labels (N,) int64) of one split of a packed dataset folder."""
    manifest = read_manifest(dataset_dir)
    if split not in manifest["splits"]:
        raise DataError(f"Dataset {dataset_dir} has no '{split}' split; it has {', '.join(manifest['splits'])}.")
    files = manifest["splits"][split]["files"]
    images = np.load(Path(dataset_dir) / files["images"], mmap_mode="r")
    labels = np.load(Path(dataset_dir) / files["labels"]).astype(np.int64)
    return images, labels


# ---------------------------------------------------------------------------------------------
# A version in S3 -> a node-local cache


def manifest_bytes(uri: str, endpoint: str = "") -> bytes:
    """manifest.json of the packed dataset at `uri` (a folder or an s3:// version), as stored."""
    return _manifest_path(uri).read_bytes() if not storage.is_s3(uri) else _remote_manifest_bytes(uri, endpoint)


def check_dataset(uri: str, endpoint: str = "") -> None:
    """StorageError when the packed dataset at an s3:// `uri` has no manifest (missing or incomplete)."""
    _remote_manifest_bytes(uri, endpoint)


def _remote_manifest_bytes(uri: str, endpoint: str) -> bytes:
    raw = storage.read_bytes(storage.join(uri, MANIFEST), endpoint)
    if raw is None:
        raise StorageError(
            f"{uri} has no {MANIFEST}: the dataset version is missing or its upload did not finish; "
            "run jobs/prepare_data.py for it (again) or fix data.uri."
        )
    return raw


def local_dataset_dir(uri: str, cache_dir: str = CACHE_DIR, endpoint: str = "") -> Path:
    """A local folder holding the packed dataset at `uri` (local folders are used in place).

    For s3:// the packed arrays are downloaded once per node into `cache_dir/datasets/<key>/`,
    key = sha256 of the dataset's manifest.json, so a new version of the data gets a new folder.
    A file lock makes the workers of one node share one download: the first takes the lock and
    downloads, the others wait for it and then find the folder complete. Every file is checked
    against the manifest's sha256 before the manifest is written, last.
    """
    if not storage.is_s3(uri):
        return Path(uri).expanduser()
    raw = _remote_manifest_bytes(uri, endpoint)
    manifest = json.loads(raw)
    key = cache_key(raw)
    root = Path(cache_dir).expanduser() / "datasets"
    target = root / key
    root.mkdir(parents=True, exist_ok=True)
    with node_lock(root / f"{key}.lock"):
        if (target / MANIFEST).is_file():
            return target
        # Per host and process, so two downloads never write into one folder even when nodes share
        # the cache; a dead process's is taken over with its verified files.
        partial = resumed_partial(target)
        _logger.info("Downloading the packed dataset %s into %s", uri, target)
        wanted = sorted(manifest["files"])  # the packed arrays and report.json, not the originals
        have = {
            name
            for name in wanted
            if (partial / name).is_file() and file_sha256(partial / name) == manifest["files"].get(name)
        }  # resume: keep verified files
        storage.download_files(
            {name: partial / name for name in wanted if name not in have}, uri, endpoint, desc=f"dataset {key}"
        )
        for name in wanted:
            if file_sha256(partial / name) != manifest["files"].get(name):
                (partial / name).unlink()
                raise StorageError(
                    f"{storage.join(uri, name)} does not match the sha256 in its manifest; "
                    "the dataset is damaged, prepare it again."
                )
        (partial / MANIFEST).write_bytes(raw)  # last: a folder with a manifest is complete
        try:
            os.replace(partial, target)
        except OSError:
            # Another host sharing this cache folder (the node lock may not reach across NFS
            # clients) finished first; its complete copy is as good as ours.
            if not (target / MANIFEST).is_file():
                raise
            shutil.rmtree(partial, ignore_errors=True)
    return target
