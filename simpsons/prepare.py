"""Raw images -> a packed, validated dataset folder (see data.py for its layout)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from simpsons.data import find_splits, pack_split, read_manifest, scan_split, write_packed

_logger = logging.getLogger(__name__)


def pack_tree(root: str | Path, out_dir: str | Path, stored_size: int = 144, workers: int = 0) -> dict:
    """Pack every split found under `root` (train/val/testset folders) into `out_dir`."""
    root = Path(root)
    splits = find_splits(root)
    base = splits["train"].parent
    packed = {}
    for name, split_dir in splits.items():
        records = scan_split(split_dir, root=base)
        packed[name] = pack_split(records, stored_size, workers, desc=f"pack {name}")
        print(f"{name}: {len(packed[name].labels)} images packed, {len(packed[name].bad_files)} left out", flush=True)
    return write_packed(out_dir, packed, stored_size)


def cached_pack(root: str | Path, cache_dir: str | Path, stored_size: int = 144, workers: int = 0) -> Path:
    """Pack `root` into the cache once; later calls with the same tree and size reuse it."""
    root = Path(root).expanduser().resolve()
    key = hashlib.sha256(f"{root}|{stored_size}".encode()).hexdigest()[:16]
    out_dir = Path(cache_dir).expanduser() / "packed" / key
    try:
        read_manifest(out_dir)
        print(f"Using the packed dataset in {out_dir}", flush=True)
    except ValueError:
        pack_tree(root, out_dir, stored_size, workers)
    return out_dir
