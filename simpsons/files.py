"""Local-file plumbing shared by ingest, storage and the caches: sha256 digests, atomic writes,
and whether the process that left a partial folder behind still runs.

Standard library only, so that `storage` can use it while knowing nothing of datasets.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CACHE_KEY_DIGITS = 16  # hex digits of a sha256 that name a cache folder


def sha256_hex(data: bytes | str) -> str:
    """sha256 of bytes (or of a string's UTF-8), as 64 hex digits."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def cache_key(data: bytes | str) -> str:
    """A short, stable folder name for what `data` identifies (a URL, settings, a manifest's bytes)."""
    return sha256_hex(data)[:CACHE_KEY_DIGITS]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: str | Path) -> str:
    """MD5 of a file: what S3 reports as the ETag of an object uploaded in one part (not a security check)."""
    return hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def sha256_files(paths: Iterable[Path], workers: int = 4) -> list[str]:
    """sha256 of each file, a few at a time (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(file_sha256, paths))


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `path` through a sibling temporary file and a rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a partial folder named after it may be taken over if not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
