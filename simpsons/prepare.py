"""Raw images -> a validated, split, packed dataset -> a versioned dataset in object storage.

    tree = scan_tree(root)                       which images, which split, which class
    build_dataset(tree, out_dir, stored_size)    decode each image once, split if needed, pack,
                                                 write report.json and manifest.json (dataset.py format)
    prepare_dataset(source, dest, name, version) fetch -> scan -> build (cached) -> upload to
                                                 <dest>/datasets/<name>/<version>/, manifest last

A tree is either split (`[dataset/]{train,val,testset}/<class>/`: the given split is kept) or
not (Kaggle's `simpsons_dataset/<class>/`, optionally with the flat
`kaggle_simpson_testset/<class>_<n>.jpg`). An unsplit tree gets a stratified, seeded train/val
split in which byte-identical images, and same-class images whose 16x16 grey thumbnails
are nearly equal (re-encodes, resizes of one frame), always land on the same side. A class with fewer than
`min_class_size` images stays in train whole, and report.json says so.

The uploaded version holds `originals/<path in the source>` for every kept image, the packed
arrays, report.json, and last manifest.json: class names, counts per split and the sha256 of
every object. Its `fingerprint` (the sha256 of every input file and of the settings) lets a
re-run see that a version is already complete, and a partial upload is completed by sending
only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import numpy as np

from simpsons import storage
from simpsons.archive import MAX_FILE_BYTES
from simpsons.data import (
    CLASS_NAMES,
    DataError,
    ImageRecord,
    PackedSplit,
    TreeProblems,
    class_counts,
    find_layout,
    pack_split,
    unread_summary,
)
from simpsons.dataset import MANIFEST, REPORT, read_manifest, write_packed
from simpsons.files import cache_key, file_sha256, fresh_partial, sha256_files, sha256_hex
from simpsons.names import CACHE_DIR, STORED_SIZE
from simpsons.sources import fetch_source

_logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the same inputs would give a different dataset


# ---------------------------------------------------------------------------------------------
# Finding the images


@dataclass
class Tree:
    root: Path  # what fetch_source returned; record relpaths are relative to it
    groups: dict[str, list[ImageRecord]]  # split name -> records; "unsplit" when a split must be made
    notes: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))  # label order
    unread: list[dict] = field(default_factory=list)  # {"path", "reason"}: over the size limit, never read

    @property
    def records(self) -> list[ImageRecord]:
        return [r for records in self.groups.values() for r in records]


def scan_tree(
    root: str | Path,
    class_names: Sequence[str] | str = CLASS_NAMES,
    max_depth: int = 4,
    max_bytes: int = MAX_FILE_BYTES,
) -> Tree:
    """Every image under `root`, by split (or "unsplit"), labelled by the class list (see data.find_layout).

    `class_names="auto"` takes the tree's own class folders, sorted. Unknown class folders and
    misnamed test-set files anywhere in the tree are raised together, in one DataError; empty
    class folders, alone, are only noted. Files over `max_bytes` (and archive members that were
    not unpacked for that reason) are listed in `unread` and never opened.
    """
    layout = find_layout(root, class_names, max_depth)
    if class_names == "auto":
        class_names = layout.class_folder_names()
    problems = TreeProblems(unread=list(layout.unread))
    notes = list(layout.notes)
    groups = {name: layout.scan(name, class_names, max_bytes, problems) for name in layout.names()}
    if layout.given_split and "val" not in groups:
        groups["unsplit"] = groups.pop("train")
        notes.append("no val folder: train is split into train and val")
    if layout.flat_testset is not None:
        if groups["testset"]:
            notes.append(
                f"flat test set ({len(groups['testset'])} images named <class>_<n>) found in "
                f"{layout.flat_testset.relative_to(layout.root).as_posix()}"
            )
        else:
            del groups["testset"]
    problems.raise_if_any(len(class_names))
    if problems.unread:
        notes.append(unread_summary(problems.unread))
    return Tree(layout.root, groups, notes + problems.notes(), list(class_names), problems.unread)


# ---------------------------------------------------------------------------------------------
# Splitting


NEAR_DUPLICATE = (
    3.0  # grey levels (0-255): mean |difference| of 16x16 thumbnails below which two images are one picture
)


def thumbnails(images: np.ndarray, side: int = 16, chunk: int = 512):
    """(N, S, S, 3) uint8 images -> (N, side*side) float32 tensor of grey, area-averaged thumbnails."""
    import torch
    import torch.nn.functional as F

    if not len(images):
        return torch.zeros(0, side * side)
    return torch.cat(
        [
            F.adaptive_avg_pool2d(
                torch.from_numpy(np.ascontiguousarray(images[i : i + chunk])).float().mean(-1)[:, None], side
            ).flatten(1)
            for i in range(0, len(images), chunk)
        ]
    )


def near_duplicate_pairs(thumbs, labels: np.ndarray, threshold: float = NEAR_DUPLICATE) -> np.ndarray:
    """(P, 2) index pairs (i < j) of same-class images that are one picture (re-encoded, resized, or
    the neighbouring frame of a video).

    Two images are near-identical when the mean absolute difference of their `thumbnails` is under
    `threshold` grey levels (re-encodes measure 1-2, different pictures 4 and up). Compared within
    each class only (sum of n_c^2 pairs): about 8 CPU-seconds for the 14,240-image sample.
    """
    import torch

    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for start in range(0, len(members), 1024):
            rows = members[start : start + 1024]
            distance = torch.cdist(thumbs[rows], thumbs[members], p=1) / thumbs.shape[1]  # (rows, members)
            i, j = (t.numpy() for t in torch.nonzero(distance < threshold, as_tuple=True))
            keep = rows[i] < members[j]
            pairs.append(np.stack([rows[i][keep], members[j][keep]], axis=1))
    return np.concatenate(pairs)


def duplicate_groups(sha256: list[str], pairs: np.ndarray) -> np.ndarray:
    """(N,) group id: images joined by an equal sha256 or by a near-duplicate pair share one."""
    parent = list(range(len(sha256)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        first.setdefault(digest, i)
        parent[find(i)] = find(first[digest])
    for i, j in pairs.tolist():
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(sha256))])


def stratified_split(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int, min_class_size: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(train indices, val indices, classes kept whole in train).

    Per class, its duplicate groups in a seeded order go to val until the class has
    round(n * val_fraction) val images; a group is never divided, so no duplicate is on both sides.
    """
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(groups, return_inverse=True)
    members_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])  # per group
    side = np.zeros(len(labels), dtype=np.int8)  # 0 unassigned, 1 train, 2 val
    small = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        target = round(len(members) * val_fraction)
        class_groups = np.unique(inverse[members])
        if len(members) < min_class_size or target == 0 or len(class_groups) < 2:
            small.append(int(label))
            target = 0
        in_val = int(((side == 2) & (labels == label)).sum())  # placed through groups shared with a class before
        for group in rng.permutation(class_groups):
            in_group = members_of[group]
            if side[in_group].any():
                continue  # already placed through another class's member
            if in_val < target:
                side[in_group] = 2
                in_val += int((labels[in_group] == label).sum())
            else:
                side[in_group] = 1
    return np.flatnonzero(side == 1), np.flatnonzero(side == 2), small


def _subset(split: PackedSplit, index: np.ndarray) -> PackedSplit:
    return PackedSplit(
        split.images[index], split.labels[index], [split.sources[i] for i in index], [split.sha256[i] for i in index]
    )


# ---------------------------------------------------------------------------------------------
# Building the packed dataset


def build_dataset(
    tree: Tree,
    out_dir: str | Path,
    stored_size: int = STORED_SIZE,
    workers: int = 0,
    val_fraction: float = 0.15,
    seed: int = 0,
    min_class_size: int = 5,
    extra_manifest: dict | None = None,
) -> dict:
    """Decode, validate, split and pack `tree` into `out_dir` (written whole or not at all).

    Nothing is written when training could not use the result: no usable training image, an
    empty validation split, or a class with validation images but none to train on.
    """
    out_dir = Path(out_dir)
    class_names = tree.class_names
    started = time.perf_counter()
    packed = {
        name: pack_split(records, stored_size, workers, desc=f"pack {name}") for name, records in tree.groups.items()
    }
    seconds = time.perf_counter() - started
    found = len(tree.records)
    bad_files = {name: split.bad_files for name, split in packed.items()}
    if tree.unread:
        bad_files["unread"] = tree.unread
    report: dict = {"notes": list(tree.notes), "images_found": found, "bad_files": bad_files}
    if not any(len(split.labels) for split in packed.values()):
        _refuse(NO_TRAINING_IMAGE, bad_files, found, ADD_IMAGES)
    small: list[int] = []
    if "unsplit" in packed:
        pool = packed.pop("unsplit")
        groups = duplicate_groups(pool.sha256, near_duplicate_pairs(thumbnails(pool.images), pool.labels))
        train, val, small = stratified_split(pool.labels, groups, val_fraction, seed, min_class_size)
        packed = {"train": _subset(pool, train), "val": _subset(pool, val), **packed}
        sizes = np.bincount(np.unique(groups, return_inverse=True)[1])
        report["split"] = {
            "method": "stratified by class, seeded; duplicates kept on one side",
            "val_fraction": val_fraction,
            "seed": seed,
            "min_class_size": min_class_size,
            "duplicate_groups": int((sizes > 1).sum()),
            "images_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        }
    else:
        report["split"] = {"method": "given by the source's folders"}
        report["notes"] += _near_duplicates_across(packed)
    report["small_classes_kept_in_train"] = [
        {
            "class": class_names[c],
            "images": int((packed["train"].labels == c).sum()),
            "reason": f"fewer than {min_class_size} images (or all duplicates of one): too few to split",
        }
        for c in small
    ]
    _refuse_unusable(packed, class_names, bad_files, found, "unsplit" not in tree.groups)
    report["notes"] += _split_notes(packed, class_names)
    report["counts"] = {
        name: dict(zip(class_names, class_counts(s.labels, len(class_names)))) for name, s in packed.items()
    }
    kept = sum(len(s.labels) for s in packed.values())
    report["images_kept"] = kept
    _logger.info(
        "Decoded %d images in %.1f s (%.0f images/s); kept %d, left out %d (see report.json)",
        found,
        seconds,
        found / max(seconds, 1e-9),
        kept,
        found - kept,
    )

    # Written into its partial and renamed: out_dir either holds a whole dataset or nothing.
    partial = fresh_partial(out_dir)
    manifest = write_packed(partial, packed, stored_size, extra_manifest, class_names)
    (partial / REPORT).write_text(json.dumps(report, indent=1))  # the full report in place of write_packed's
    manifest["files"][REPORT] = file_sha256(partial / REPORT)
    for name, split in packed.items():
        manifest["splits"][name]["sources"] = split.sources  # row i of the arrays came from sources[i]
    manifest["pack_images_per_s"] = round(found / max(seconds, 1e-9), 1)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return manifest


NO_TRAINING_IMAGE, ADD_IMAGES = "the training split has no usable image", "add decodable images to the class folders"


def _refuse(what: str, bad_files: dict[str, list[dict]], found: int, fix: str) -> None:
    left_out = [b for files in bad_files.values() for b in files]
    example = f", e.g. {left_out[0]['path']}: {left_out[0]['reason']}" if left_out else ""
    raise DataError(
        f"No dataset written: {what} ({found} image file(s) found, {len(left_out)} left out{example}); {fix}."
    )


def _refuse_unusable(
    packed: dict[str, PackedSplit], class_names, bad_files: dict, found: int, given_split: bool
) -> None:
    """Raise before writing when training could not use the split (see build_dataset)."""
    train = class_counts(packed["train"].labels, len(class_names))
    val = class_counts(packed["val"].labels, len(class_names))
    if not sum(train):
        _refuse(NO_TRAINING_IMAGE, bad_files, found, ADD_IMAGES)
    if not sum(val):
        _refuse(
            "the validation split is empty",
            bad_files,
            found,
            "add images to the val/<class>/ folders"
            if given_split
            else "add images: every class is too small to split off validation images (see --val-fraction)",
        )
    orphans = [name for name, t, v in zip(class_names, train, val) if v and not t]
    if orphans:
        _refuse(
            f"{len(orphans)} class(es) have validation images but no training image ({', '.join(orphans[:3])})",
            bad_files,
            found,
            "add training images of them or remove them from val",
        )


def _near_duplicates_across(packed: dict[str, PackedSplit]) -> list[str]:
    """A note on near-identical pairs that a given split puts on both sides (kept as given)."""
    import torch

    splits = list(packed.values())
    thumbs = torch.cat([thumbnails(s.images) for s in splits])
    labels = np.concatenate([s.labels for s in splits])
    which = np.concatenate([np.full(len(s.labels), k) for k, s in enumerate(splits)])
    sha = [h for s in splits for h in s.sha256]
    pairs = near_duplicate_pairs(thumbs, labels)
    across = sum(1 for i, j in pairs.tolist() if which[i] != which[j] and sha[i] != sha[j])
    if not across:
        return []
    return [
        f"{across} near-identical image pair(s) (re-encodes or neighbouring video frames) straddle the given "
        f"splits {', '.join(packed)}; kept as given"
    ]


def _split_notes(packed: dict[str, PackedSplit], class_names) -> list[str]:
    notes = []
    for name, split in packed.items():
        missing = [
            class_names[i]
            for i, n in enumerate(class_counts(split.labels, len(class_names)))
            if n == 0 and (packed["train"].labels == i).any()
        ]
        if missing and name != "train":
            notes.append(f"{name} has no images of {len(missing)} class(es) present in train: {', '.join(missing)}")
    names = list(packed)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = set(packed[a].sha256) & set(packed[b].sha256)
            if shared:
                notes.append(
                    f"{len(shared)} byte-identical image(s) appear in both {a} and {b} (as given by the source)"
                )
    return notes


def pack_tree(
    root: str | Path,
    out_dir: str | Path,
    stored_size: int,
    workers: int,
    class_names: Sequence[str] | str = CLASS_NAMES,
    max_bytes: int = MAX_FILE_BYTES,
) -> None:
    """Pack every image under `root` (split or not; see scan_tree) into `out_dir`."""
    build_dataset(scan_tree(root, class_names, max_bytes=max_bytes), out_dir, stored_size, workers)


def cached_pack(
    root: str | Path,
    cache_dir: str | Path,
    stored_size: int = STORED_SIZE,
    workers: int = 0,
    class_names: Sequence[str] | str = CLASS_NAMES,
    max_bytes: int = MAX_FILE_BYTES,
) -> Path:
    """Pack `root` into the cache once; later calls with the same tree and settings reuse it."""
    root = Path(root).expanduser().resolve()
    classes = class_names if class_names == "auto" else list(class_names)
    key = cache_key(json.dumps([str(root), stored_size, classes, max_bytes]))
    out_dir = Path(cache_dir).expanduser().resolve() / "packed" / key  # absolute: Ray workers run elsewhere
    try:
        read_manifest(out_dir)
        _logger.info("Using the packed dataset in %s", out_dir)
    except ValueError:
        pack_tree(root, out_dir, stored_size, workers, class_names, max_bytes)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Preparing a versioned dataset in object storage


@dataclass
class Prepared:
    uri: str  # <dest>/datasets/<name>/<version>
    images: int  # kept images in the dataset
    files_sent: int  # objects uploaded by this run (0 when the version was already complete)
    bytes_sent: int
    seconds: float
    pack_images_per_s: float | None  # None when the packed arrays came from the local cache


def prepare_dataset(
    source: str,
    dest: str,
    name: str = "simpsons",
    version: str = "v1",
    stored_size: int = STORED_SIZE,
    workers: int = 0,
    cache_dir: str = CACHE_DIR,
    endpoint: str = "",
    val_fraction: float = 0.15,
    seed: int = 0,
    min_class_size: int = 5,
    class_names: Sequence[str] | str = CLASS_NAMES,
    max_image_bytes: int = MAX_FILE_BYTES,
) -> Prepared:
    """Fetch, validate, split, pack and upload `source` as <dest>/datasets/<name>/<version>/."""
    started = time.perf_counter()
    for label, value in (("name", name), ("version", version)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise DataError(f"Dataset {label} {value!r} may hold only letters, digits, '.', '_' and '-'; pick another.")
    if not 0 < val_fraction < 1:
        raise DataError(
            f"The validation fraction {val_fraction} must be more than 0 and less than 1; pass e.g. --val-fraction 0.15."
        )
    uri = storage.join(dest, "datasets", name, version)
    if storage.is_s3(dest):
        storage.check_bucket(dest, endpoint)  # before any long work: say a wrong bucket/endpoint now

    tree = scan_tree(
        fetch_source(source, cache_dir, max_image_bytes=max_image_bytes), class_names, max_bytes=max_image_bytes
    )
    records = tree.records
    shas = sha256_files([r.path for r in records])
    settings = {
        "format": FORMAT,
        "stored_size": stored_size,
        "val_fraction": val_fraction,
        "seed": seed,
        "min_class_size": min_class_size,
        "class_names": tree.class_names,
        "max_image_bytes": max_image_bytes,
    }
    inputs = sorted(zip((r.relpath for r in records), shas))
    fingerprint = sha256_hex(json.dumps([inputs, settings]))

    remote = storage.read_bytes(storage.join(uri, MANIFEST), endpoint)
    if remote is not None:
        done = json.loads(remote)
        if done.get("fingerprint") != fingerprint:
            raise DataError(
                f"{uri} already holds a complete dataset made from other images or settings; "
                "pass a new --version (a version never changes once its manifest is written)."
            )
        _logger.info("%s is already complete with these inputs; nothing to send.", uri)
        return Prepared(
            uri, sum(s["images"] for s in done["splits"].values()), 0, 0, time.perf_counter() - started, None
        )

    staging = Path(cache_dir).expanduser() / "prepared" / fingerprint[:16]
    rate = None
    if not (staging / MANIFEST).is_file():
        extra = {
            "name": name,
            "version": version,
            "fingerprint": fingerprint,
            "settings": settings,
            "source": _public(source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        rate = build_dataset(tree, staging, stored_size, workers, val_fraction, seed, min_class_size, extra)[
            "pack_images_per_s"
        ]
    else:
        _logger.info("Using the packed dataset in %s (built before from the same inputs)", staging)
    manifest = json.loads((staging / MANIFEST).read_text())

    # Every object of the version, key -> (local file, sha256); the manifest lists them all.
    objects = {f"originals/{rel}": (tree.root / rel, sha) for rel, sha in manifest["sources"].items()}
    objects.update({fname: (staging / fname, sha) for fname, sha in manifest["files"].items()})
    manifest["objects"] = {key: sha for key, (_, sha) in sorted(objects.items())}
    sent, sent_bytes = storage.sync_files(
        {k: p for k, (p, _) in objects.items()},
        uri,
        {k: s for k, (_, s) in objects.items()},
        endpoint,
        desc=f"upload {name}/{version}",
    )
    storage.write_bytes(json.dumps(manifest, indent=1).encode(), storage.join(uri, MANIFEST), endpoint)  # last
    images = sum(s["images"] for s in manifest["splits"].values())
    seconds = time.perf_counter() - started
    counts = ", ".join(f"{k} {v['images']:,}" for k, v in manifest["splits"].items())
    _logger.info(
        "Dataset %s: %s images (%s); sent %s files (%.1f MiB) in %.1f s. Train on it with --set data.uri=%s",
        uri,
        f"{images:,}",
        counts,
        f"{sent:,}",
        sent_bytes / 2**20,
        seconds,
        uri,
    )
    return Prepared(uri, images, sent + 1, sent_bytes, seconds, rate)


def _public(source: str) -> str:
    """The source without user info, query or fragment (they may hold tokens): safe to store."""
    parsed = urlparse(str(source))
    if parsed.scheme in ("http", "https"):
        return urlunparse((parsed.scheme, parsed.hostname or "", parsed.path, "", "", ""))
    return str(source)
