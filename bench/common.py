"""What the benchmarks share: where the data comes from, how figures are printed, how to skip.

Every benchmark prints its figures on stdout, one per line, as `name value` (a number), so a
test or a script can parse them; progress and notes go to stderr. A benchmark that cannot run
here (no real sample, no CUDA) prints one line starting with `skipped ` and exits 0.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# The real sample shipped beside the repository (see ../shared/data/README.md); never copied into it.
REAL_ARCHIVE = REPO.parent / "shared" / "data" / "simpsons_dataset" / "dataset.tar.xz"
DEFAULT_CACHE = REPO / "bench" / "out" / "cache"


def emit(name: str, value: float, digits: int = 2) -> None:
    """One figure on stdout: `name value`."""
    print(f"{name} {value:.{digits}f}", flush=True)


def note(message: str) -> None:
    """Progress and explanations: stderr, so stdout holds only figures."""
    print(message, file=sys.stderr, flush=True)


def skip(reason: str) -> None:
    """Say in one line why this benchmark does not run here, and exit 0."""
    print(f"skipped {reason}", flush=True)
    sys.exit(0)


@contextlib.contextmanager
def stdout_to_stderr():
    """Inside, whatever is written to file descriptor 1 goes to stderr: Ray's driver prints lines of
    its own there (e.g. `(raylet) Task ServeController.graceful_shutdown failed ...`), even with
    log_to_driver off, and stdout must hold only figures."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def load_average() -> float:
    """The 1-minute load average: how busy the machine was while a figure was measured."""
    return os.getloadavg()[0]


def real_sample_tree(cache: Path, archive: Path = REAL_ARCHIVE) -> Path | None:
    """The real sample unpacked once into the cache (a tree with dataset/train, dataset/val), or None.

    Unpacked as training's data sources are (simpsons.sources.fetch_source: the hardened
    archive.safe_extract, into `cache/unpacked/<key>`), so a benchmark reads the same tree.
    """
    if not archive.is_file():
        return None
    from simpsons.sources import fetch_source

    return fetch_source(archive, cache)


def image_tree(images: str | None, cache: Path, archive: Path = REAL_ARCHIVE) -> Path:
    """The image-folder tree to benchmark on: `--images` if given, else the real sample (or skip).

    An --images tree may have any layout training reads (simpsons.data.find_layout).
    """
    if images:
        from simpsons.data import DataError, find_layout

        try:
            find_layout(images)
        except (DataError, OSError) as exc:
            raise SystemExit(f"error: --images {images}: {exc}") from None
        return Path(images)
    tree = real_sample_tree(cache, archive)
    if tree is None:
        skip(f"the real sample {archive} is not here; pass --archive <dataset.tar.xz> or --images <image tree>.")
    return tree


def packed(tree: Path, cache: Path, stored_size: int) -> Path:
    """The tree packed once into the cache (uint8 arrays, see simpsons/dataset.py)."""
    from simpsons.prepare import cached_pack

    return cached_pack(tree, cache, stored_size)


def stored_size_for(train_size: int) -> int:
    """The stored side for a train side, in the default config's ratio (144 px stored for 128 px)."""
    return max(train_size, round(train_size * 144 / 128))


def forever(make_iterable):
    """Chain `make_iterable()` calls forever (e.g. one epoch of batches after another)."""
    while True:
        yield from make_iterable()


class ReadyInputs:
    """The preset of a step fed a ready (B, 3, T, T) input tensor: the network's step with no data
    path at all, at `train_size` like the presets it is compared with."""

    def __init__(self, train_size: int):
        self.train_size = train_size

    def __call__(self, images, generator=None):
        return images

    def mix(self, x, generator=None):
        return x, None  # no mixup or cutmix: TrainStep's labels as they are


def add_size_arg(parser) -> None:
    """`--size`: the side of the training images, for the benchmarks that train."""
    parser.add_argument(
        "--size", type=int, default=128, help="side of the training images in px (default: %(default)s)"
    )


def add_common_args(parser, quick_help: str) -> None:
    add_image_args(parser)
    from simpsons.cli import add_config_args

    add_config_args(
        parser,
        config_help="YAML config for this project's pipeline (default: the built-in defaults)",
        set_help="config override, e.g. --set train.precision=fp32",
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)


def add_image_args(parser) -> None:
    """`--images`, `--archive` and `--cache`: where image_tree() finds the images."""
    parser.add_argument(
        "--images", help="image tree to use instead of the real sample (<root>/dataset/{train,val}/<class>/*.jpg)"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=REAL_ARCHIVE,
        help="the real sample's dataset.tar.xz, unpacked once into the cache (default: %(default)s)",
    )
    parser.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE),
        help="where the unpacked and packed sample are kept (default: %(default)s)",
    )


def default_best(folder: Path) -> Path:
    """A best/ folder as training writes it (checkpoint.pt, and the exported model.pt2) holding the
    default config's network with its initial weights, for 42 classes: for benchmarks that time
    inference, where the weights do not change the time."""
    import torch

    from simpsons.checkpoint import FORMAT, save
    from simpsons.config import load_config, to_dict
    from simpsons.deploy import MODEL_FILE, export_model
    from simpsons.model import create_model

    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = create_model(42, cfg.model.head, cfg.model.dropout, cfg.model.arch).eval()
    names = [f"class_{i}" for i in range(42)]
    save(folder, {"model": model.state_dict(), "config": to_dict(cfg), "class_names": names, "format": FORMAT}, {})
    export_model(model, cfg, names, Path(folder) / MODEL_FILE)
    return Path(folder)
