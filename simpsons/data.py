"""Image-folder trees -> decoded uint8 arrays -> a resident, sharded, seeded batch loader.

`find_layout` is the one reader of a tree's layout, for training, evaluation and benchmarks:
the original project's `[dataset/]{train,val,testset}/<class>/*.jpg`, or Kaggle's
`simpsons_dataset/<class>/*.jpg` with its flat `kaggle_simpson_testset/<class>_<n>.jpg`. Labels
are indices into the class list (default: the fixed CLASS_NAMES), so a split missing a class
never shifts the labels of the others. The packed-dataset folder format is simpsons.dataset's.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simpsons.archive import UNREAD_LIST
from simpsons.errors import UserError
from simpsons.files import sha256_hex
from simpsons.names import CLASS_NAMES

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
SPLIT_NAMES = ("train", "val", "testset")
_FLAT_NAME = re.compile(r"^(?P<cls>[a-z_]+?)_(?P<n>\d+)$")  # kaggle_simpson_testset/<class>_<n>.jpg


class DataError(UserError, ValueError):
    """Input data the job cannot use; the message names the file or folder and the fix."""


@dataclass
class ImageRecord:
    path: Path  # source file
    label: int  # index into the class list
    relpath: str  # path inside the dataset root, used in reports and manifests


@dataclass
class PackedSplit:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) int16
    sources: list[str]  # relpath of each kept image
    sha256: list[str]  # sha256 of each kept source file
    bad_files: list[dict] = field(default_factory=list)  # {"path", "reason"} for each file left out


# ---------------------------------------------------------------------------------------------
# Finding images


@dataclass
class Layout:
    """Where an image tree keeps its images: the one answer for training, evaluation and benchmarks.

    Either split (`[dataset/]{train,val,testset}/<class>/`: `splits` holds the given folders) or
    not (Kaggle's `simpsons_dataset/<class>/`, or any `<class>/` folders: `splits` is
    {"unsplit": folder}, and Kaggle's flat `kaggle_simpson_testset/<class>_<n>.jpg`, when there
    is one, is `flat_testset`).
    """

    root: Path  # the folder searched; record relpaths are relative to it
    splits: dict[str, Path]  # split name -> folder of <class>/ folders
    flat_testset: Path | None = None  # folder of <class>_<n>.jpg files beside an unsplit tree
    notes: list[str] = field(default_factory=list)
    unread: list[dict] = field(default_factory=list)  # {"path", "reason"}: archive members left packed for their size

    @property
    def given_split(self) -> bool:
        return "unsplit" not in self.splits

    @property
    def train_folder(self) -> Path:
        """The class folders training learns from: the given train split, or the unsplit tree."""
        return self.splits.get("train") or self.splits["unsplit"]

    def names(self) -> list[str]:
        """The groups of images there are: the split names, and "testset" for a flat test set."""
        return [*self.splits, *(["testset"] if self.flat_testset else [])]

    def folder(self, name: str) -> Path:
        """The folder that group `name` (one of names()) is read from."""
        return self.flat_testset if name == "testset" and self.flat_testset is not None else self.splits[name]

    def scan(self, name: str, class_names: Sequence[str], max_bytes: int, problems: TreeProblems) -> list[ImageRecord]:
        """The image records of group `name` (one of names()), problems collected into `problems`."""
        if self.folder(name) == self.flat_testset:
            return scan_flat_testset(self.flat_testset, class_names, self.root, max_bytes, problems)
        return scan_split(self.splits[name], class_names, self.root, max_bytes, problems)

    def class_folder_names(self) -> list[str]:
        """The tree's own class folders, sorted (data.classes=auto)."""
        return sorted({p.name for folder in self.splits.values() for p in _subfolders(folder)})


def find_layout(root: str | Path, class_names: Sequence[str] | str = CLASS_NAMES, max_depth: int = 4) -> Layout:
    """The layout of the image tree at or within `max_depth` folders below `root`; DataError when there is none.

    The shallowest folder that holds `train/` or class folders (named as a class of
    `class_names`; with "auto", any subfolder holding images) wins.
    """
    root = Path(root).resolve()
    known = None if class_names == "auto" else set(class_names)
    unread = unread_members(root)
    for folder in _folders_breadth_first(root, max_depth) if root.is_dir() else ():  # no folder: no layout
        if (folder / "train").is_dir():
            splits = {name: folder / name for name in SPLIT_NAMES if (folder / name).is_dir()}
            notes = [f"split folders found in {_rel(folder, root)}: {', '.join(splits)}; kept as given"]
            return Layout(root, splits, None, notes, unread)
        if _holds_class_folders(folder, known):
            notes = [f"class folders without a split found in {_rel(folder, root)}"]
            nested = folder / folder.name
            if nested.is_dir() and _holds_class_folders(nested, known):
                # Kaggle's download holds simpsons_dataset/ twice, one inside the other.
                notes.append(f"{_rel(nested, root)} repeats {_rel(folder, root)}; the inner copy is used")
                folder = nested
            return Layout(root, {"unsplit": folder}, _find_flat_testset(root, max_depth), notes, unread)
    more = f" ({unread_summary(unread)})" if unread else ""
    raise DataError(
        f"No images found under {root}{more}: expected [dataset/]train/<class>/*.jpg (the original layout) "
        "or <class>/*.jpg (Kaggle's simpsons_dataset) within a few folders of it."
    )


def _holds_class_folders(folder: Path, known: set[str] | None) -> bool:
    """Has a subfolder named as a known class (or, with no class list, one that holds images)."""
    if known is not None:
        return any(p.name in known for p in _subfolders(folder))
    return any(f.suffix.lower() in IMAGE_SUFFIXES for p in _subfolders(folder) for f in p.iterdir() if f.is_file())


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _folders_breadth_first(root: Path, max_depth: int):
    level = [root]
    for _ in range(max_depth + 1):
        yield from level
        level = [p for folder in level for p in _subfolders(folder)]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _find_flat_testset(root: Path, max_depth: int) -> Path | None:
    """Kaggle's test set: the first *testset* folder holding image files directly."""
    for folder in _folders_breadth_first(root, max_depth):
        if "testset" in folder.name.lower() and _images_in(folder):
            return folder
    return None


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return "the source folder" if rel == "." else rel


def unread_members(root: Path) -> list[dict]:
    """Archive members left packed for their size (archive.UNREAD_LIST of each archive unpacked at or below `root`)."""
    unread = []
    for listing in [root / UNREAD_LIST, *sorted(root.glob(f"*/{UNREAD_LIST}"))]:
        if listing.is_file():
            base = listing.parent.relative_to(root)
            unread += [
                {"path": (base / item["path"]).as_posix(), "reason": item["reason"]}
                for item in json.loads(listing.read_text())
            ]
    return unread


def unread_summary(unread: list[dict]) -> str:
    return f"{len(unread)} file(s) left out unread for their size, e.g. {unread[0]['path']} ({unread[0]['reason']})"


@dataclass
class TreeProblems:
    """What is wrong with an image tree, collected over the whole tree and reported at once."""

    unknown: list[str] = field(default_factory=list)  # class folders not in the class list
    empty: list[str] = field(default_factory=list)  # class folders without an image (alone: a note)
    misnamed: list[str] = field(default_factory=list)  # flat test-set files not named <class>_<n>
    unread: list[dict] = field(default_factory=list)  # {"path", "reason"}: over the size limit, never read

    def raise_if_any(self, num_classes: int) -> None:
        """One DataError naming every problem (counted, the first few by path); empty folders alone pass."""
        if not (self.unknown or self.misnamed):
            return
        parts = [
            _counted(self.unknown, f"unknown class folder(s) (not one of the {num_classes} known classes)"),
            _counted(self.misnamed, "test-set file(s) not named <class>_<number> with a known class"),
            _counted(self.empty, "class folder(s) without images"),
        ]
        raise DataError(
            f"The image tree has {'; '.join(p for p in parts if p)}; rename or remove them, "
            "or set data.classes=auto to use the tree's own class folders."
        )

    def notes(self) -> list[str]:
        return [f"{_counted(self.empty, 'class folder(s) without images')}: ignored"] if self.empty else []


def _counted(paths: list[str], what: str, shown: int = 3) -> str:
    if not paths:
        return ""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"{len(paths)} {what}: {', '.join(paths[:shown])}{more}"


def scan_split(
    split_dir: str | Path,
    class_names: Sequence[str] = CLASS_NAMES,
    root: Path | None = None,
    max_bytes: int | None = None,
    problems: TreeProblems | None = None,
) -> list[ImageRecord]:
    """Every image file under `split_dir/<class>/`, labelled by the class list.

    Files over `max_bytes` are listed in `problems.unread` and never opened. With `problems`
    given, unknown and empty class folders are collected there for the caller to report with the
    rest of the tree; without it they are raised here.
    """
    split_dir = Path(split_dir)
    root = root or split_dir.parent
    collect = problems is not None
    problems = problems if collect else TreeProblems()
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rel = class_dir.relative_to(root).as_posix()
        if class_dir.name not in index:
            problems.unknown.append(rel)
            continue
        files = _images_in(class_dir)
        if not files:
            problems.empty.append(rel)
        for f in files:
            relpath = f.relative_to(root).as_posix()
            size = f.stat().st_size
            if max_bytes is not None and size > max_bytes:
                problems.unread.append({"path": relpath, "reason": too_large(size, max_bytes)})
            else:
                records.append(ImageRecord(f, index[class_dir.name], relpath))
    if not collect:
        problems.raise_if_any(len(class_names))
        if not records:
            raise DataError(f"No class folders with images under {split_dir}; add <class>/*.jpg folders to it.")
    return records


def scan_flat_testset(
    folder: Path, class_names: Sequence[str], root: Path, max_bytes: int, problems: TreeProblems
) -> list[ImageRecord]:
    """Kaggle's flat test set: every `<class>_<n>.jpg` in `folder`, labelled by the class in its name.

    Files named otherwise (or after an unknown class) go to `problems.misnamed`, files over
    `max_bytes` to `problems.unread`.
    """
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for path in _images_in(folder):
        match = _FLAT_NAME.match(path.stem)
        relpath = path.relative_to(root).as_posix()
        if not match or match["cls"] not in index:
            problems.misnamed.append(relpath)
        elif path.stat().st_size > max_bytes:
            problems.unread.append({"path": relpath, "reason": too_large(path.stat().st_size, max_bytes)})
        else:
            records.append(ImageRecord(path, index[match["cls"]], relpath))
    return records


def too_large(size: int, max_bytes: int) -> str:
    """The report's reason for a file left out unread because of its size."""
    return (
        f"{size / 2**20:,.1f} MiB, over the per-image limit of {max_bytes / 2**20:,.1f} MiB "
        "(data.max_image_bytes); not read"
    )


# ---------------------------------------------------------------------------------------------
# Decoding and packing


def load_image(data: bytes, size: int) -> np.ndarray:
    """Decode image bytes, convert to RGB, resize to (size, size) -> (size, size, 3) uint8."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at a reduced scale when the target is much smaller (much faster).
            img.draft("RGB", (size, size))
        img.load()
        if img.width == 0 or img.height == 0:
            raise ValueError("image is empty")
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(rgb, dtype=np.uint8)


def decode_failure(exc: Exception) -> str:
    """Why image bytes could not be decoded, in words (PIL's messages name in-memory file objects)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "cannot decode: not an image in a format this job reads (JPEG, PNG, BMP, GIF, WebP)"
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__
    return f"cannot decode: {text}"


def decode_image(data: bytes, size: int) -> tuple[np.ndarray | None, str]:
    """(load_image's (size, size, 3) uint8 array, "") or (None, why the bytes are not usable)."""
    if not data:
        return None, "empty file (0 bytes)"
    try:
        return load_image(data, size), ""
    except Exception as exc:  # PIL raises many types for broken files; all mean "unusable"
        return None, decode_failure(exc)


def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray | None, str, str]:
    path, size = args
    data = Path(path).read_bytes()
    image, reason = decode_image(data, size)
    return image, sha256_hex(data), reason


def pack_split(records: Sequence[ImageRecord], size: int, workers: int = 0, desc: str = "pack") -> PackedSplit:
    """Decode every image once (in a process pool) into one (N, size, size, 3) uint8 array."""
    from tqdm import tqdm  # imported where used: the training engine imports this module where tqdm is not

    workers = workers or os.cpu_count() or 1
    images = np.empty((len(records), size, size, 3), dtype=np.uint8)
    keep = np.zeros(len(records), dtype=bool)
    digests: list[str] = [""] * len(records)
    bad = []
    jobs = [(str(r.path), size) for r in records]
    chunksize = max(1, min(64, len(jobs) // (workers * 8) or 1))
    with ProcessPoolExecutor(workers) if workers > 1 else _InlineExecutor() as pool:
        results = pool.map(_decode_one, jobs, chunksize=chunksize)
        for i, (array, digest, reason) in enumerate(
            tqdm(results, total=len(jobs), desc=desc, unit="img", mininterval=1.0)
        ):
            digests[i] = digest
            if array is None:
                bad.append({"path": records[i].relpath, "reason": reason})
                _logger.warning("Leaving out %s: %s", records[i].relpath, reason)
            else:
                images[i] = array
                keep[i] = True
    kept = [r for r, k in zip(records, keep) if k]
    return PackedSplit(
        images=images[keep],
        labels=np.array([r.label for r in kept], dtype=np.int16),
        sources=[r.relpath for r in kept],
        sha256=[d for d, k in zip(digests, keep) if k],
        bad_files=bad,
    )


class _InlineExecutor:
    """ProcessPoolExecutor's map in this process (one worker: no pool to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return map(fn, items)


def class_counts(labels: np.ndarray, num_classes: int = len(CLASS_NAMES)) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


# ---------------------------------------------------------------------------------------------
# Resident loader


def data_placement(nbytes: int, device: torch.device | str, share: float) -> tuple[bool, str]:
    """(keep `nbytes` of packed splits on `device`, where they go in words, for the log): `placement`
    with this GPU's free memory and this host's available memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return True, f"in host memory ({nbytes / 2**20:.0f} MiB): training on the {device.type.upper()}"
    free, _ = torch.cuda.mem_get_info(device)
    return placement(nbytes, str(device), free, share, host_available_bytes())


def placement(nbytes: int, device: str, device_free: int, share: float, host_available: int) -> tuple[bool, str]:
    """(keep `nbytes` of packed splits on the GPU `device`, where they go in words), from the sizes alone.

    They stay resident on the GPU when they fit `share` (data.resident_share) of its free memory.
    Otherwise they stay where load_packed left them - a read-only memory map, in the page cache
    that every rank of the node shares - and each batch is gathered into a pinned buffer of its
    own and copied to the GPU: no rank pins a copy of its own (the pinned allocator rounds each
    block up to a power of two, and locked memory is never paged out). That needs the splits to
    fit the host's available memory, else every epoch would read them from disk again: refused.
    """
    size = f"{nbytes / 2**20:.0f} MiB"
    budget = f"{share:.0%} of the {device_free / 2**30:.1f} GiB free on {device}"
    if nbytes <= share * device_free:
        return True, f"resident on {device} ({size}, within {budget})"
    if nbytes > host_available:
        raise DataError(
            f"The packed train + val splits ({nbytes / 2**30:.1f} GiB) fit neither {budget} (data.resident_share) "
            f"nor the {host_available / 2**30:.1f} GiB of available host memory; raise data.resident_share, "
            "train on GPUs or nodes with more memory, or pack the data at a smaller data.stored_size."
        )
    return False, (
        f"in host memory (the page cache), gathered per batch into pinned buffers ({size} is more than {budget})"
    )


def host_available_bytes() -> int:
    """Memory the host can give without swapping: MemAvailable of /proc/meminfo (free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def mix_seed(seed: int, *parts: int) -> int:
    """One seed for one random stream, from the run's seed and what tells the streams apart
    (epoch, rank, stream number, step), so that no two streams repeat each other."""
    for part in parts:
        seed = seed * 1_000_003 + part  # a prime larger than any part (epochs, ranks, streams, steps of an epoch)
    return seed % (1 << 63)  # torch.manual_seed takes 64 bits


def _steps(images: int, batch_size: int, drop_last: bool) -> int:
    """Batches of `images` (one rank's share of an epoch): the last partial one dropped with
    `drop_last`, unless it is the only one."""
    return images // batch_size if drop_last and images >= batch_size else -(-images // batch_size)


class ResidentSplit:
    """A packed split held in memory as uint8: on the training device, or in host memory for a GPU it does not fit.

    Batches are index tensors into that memory: no copies per image, no worker processes. Each
    epoch draws one seeded permutation that every rank computes identically, and rank r takes
    every world-th element of it, trimmed so all ranks take the same number of steps (DDP needs
    equal step counts). With `on_device=False` the split stays in host memory (placement says why) and each
    batch is gathered there and copied to `device` without blocking: the same batches, slower.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, device: torch.device | str = "cpu", on_device: bool = True
    ):
        self.device, self.on_device = torch.device(device), on_device
        home = self.device if on_device else torch.device("cpu")
        # Each batch for a GPU is gathered into page-locked buffers, so its copy runs asynchronously;
        # the split itself stays in pageable memory (data.placement says why).
        self.pinned = home.type == "cpu" and self.device.type == "cuda"
        with warnings.catch_warnings():
            # A read-only memory map: the workers of a node share its page cache; never written.
            warnings.simplefilter("ignore", UserWarning)
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(home)  # (N, S, S, 3) uint8
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(home)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # idx: (B,) int64 on the split's memory -> (images (B, S, S, 3) uint8, labels (B,)) on self.device
        if self.on_device:
            return self.images[idx], self.labels[idx]
        images = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pinned)
        labels = torch.empty(len(idx), dtype=torch.int64, pin_memory=self.pinned)
        torch.index_select(self.images, 0, idx, out=images)
        torch.index_select(self.labels, 0, idx, out=labels)
        # Pinned buffers come from torch's caching host allocator, which does not hand a buffer out
        # again before its pending copy has finished.
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def train_batches(
        self,
        epoch: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch`, from position `start` of the epoch's permutation on;
        with `drop_last` without the last partial batch (unless it is the only one).

        Step i of every rank together takes the permutation's images [i * world * batch_size,
        (i + 1) * world * batch_size), so a run resumed at step k skips exactly the first
        k * world * batch_size (`start`) and trains the rest as an uninterrupted run would.
        """
        generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
        order = torch.randperm(len(self), generator=generator)
        end = len(self) // world * world  # equal shares: DDP needs the same step count on every rank
        # The epoch's images used, decided on the whole epoch (a resumed one drops what it would have)
        end = min(end, self.steps_per_epoch(batch_size, world, drop_last) * batch_size * world)
        start = min(start, end)
        # (end - start) is a multiple of world unless the run resumes with another worker count
        per_rank = (end - start) // world
        mine = order[start : start + per_rank * world][rank::world]
        if self.images.device.type == "cuda":  # through pinned memory: a pageable copy would wait for the GPU
            mine = mine.pin_memory().to(self.images.device, non_blocking=True)
        for first in range(0, per_rank, batch_size):
            yield self._batch(mine[first : first + batch_size])

    def steps_per_epoch(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        return _steps(len(self) // world, batch_size, drop_last)

    def eval_batches(
        self, batch_size: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Every image exactly once across ranks; counts may differ by one, and a rank may have no
        # batch at all, so callers must not put a collective inside the loop (see train.evaluate).
        mine = torch.arange(rank, len(self), world, device=self.images.device)
        for start in range(0, len(mine), batch_size):
            yield self._batch(mine[start : start + batch_size])
