"""Local-file plumbing shared by ingest, storage and the caches: sha256 digests, atomic writes,
partial files and folders, and a lock between the processes of one node.

Whatever is written in several steps (an unpacked archive, a packed dataset, a download) goes to
its target's partial sibling, `.{name}.partial-{host}-{pid}`, and is renamed to the target when
whole: readers never see half of it, two writers never share one partial (even on a cache folder
that several nodes share), and one left by a killed process of this host is recognised by its
dead pid, to be removed or taken over. A process's scratch folder (`scratch_folder`) follows the
same naming, so a killed worker's leftovers are removed by the next process on its node.

Standard library only, so that `storage` can use it while knowing nothing of datasets.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def partial_path(target: str | Path) -> Path:
    """Where this process writes `target` before renaming it into place (see the module's docstring)."""
    target = Path(target)
    return target.with_name(f"{_partial_prefix(target)}{os.getpid()}")


def dead_partials(target: str | Path) -> Iterator[Path]:
    """The partials of `target` left by processes of this host that have ended (another host's
    processes cannot be checked from here, so their partials are never listed)."""
    target = Path(target)
    prefix = _partial_prefix(target)
    for path in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid = path.name[len(prefix) :]
        if pid.isdigit() and not process_alive(int(pid)):
            yield path


def fresh_partial(target: str | Path) -> Path:
    """This process's partial of `target`, not there yet: those of dead processes (and an earlier
    one of this pid) are removed first."""
    partial = partial_path(target)
    for path in [*dead_partials(target), partial]:
        remove_path(path)
    return partial


def resumed_partial(target: str | Path) -> Path:
    """This process's partial of `target`; when it has none, a dead process's is renamed to it, so
    that what that process finished (downloaded bytes, verified files) is not fetched again."""
    partial = partial_path(target)
    if not partial.exists():
        for stale in dead_partials(target):
            try:
                os.replace(stale, partial)
                break
            except OSError:  # another process of this host took it over first
                continue
    return partial


def scratch_folder(name: str) -> Path:
    """This process's scratch folder `name` in the system's temp folder (a partial that is never
    renamed), made on first use after the ones of this host's ended processes are removed: what a
    killed worker left there (a checkpoint not yet uploaded) goes when the next one starts."""
    target = Path(tempfile.gettempdir()) / name
    scratch = partial_path(target)
    if not scratch.is_dir():
        fresh_partial(target).mkdir(parents=True)
    return scratch


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-{socket.gethostname()}-"


def remove_path(path: str | Path) -> None:
    """Remove a file or a folder tree, if it is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextmanager
def node_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created when missing) for the with-block; the other
    processes of this node that ask for it wait. The kernel releases it when its holder's file is
    closed or its process dies, so a killed process never leaves it held. A lock on a shared network
    folder may not reach other nodes: callers still rename into place and accept a complete result
    that another node finished first.
    """
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
