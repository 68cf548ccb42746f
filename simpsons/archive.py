"""Unpack .tar.xz / .tar.gz / .tar / .zip archives from untrusted sources, safely.

Every member is checked before a byte of it is written: its path must stay inside the target
folder (no `..`, no absolute path), it must be a regular file or a folder (no symlinks, hard
links, devices or FIFOs), and the archive may hold at most `max_members` members and
`max_bytes` unpacked bytes. A member over `max_file_bytes` (no real image is that large) is
not written: it is listed, with its size, in `.unread.json` in the target folder. Files are written by this module (never `tarfile.extract`), so
modes, owners and link targets from the archive are ignored.

Members go to a hidden sibling folder that is renamed to the target only when the whole
archive passed; a refused or broken archive leaves nothing behind and raises ArchiveError with
one sentence naming the archive, the member and the reason. The sibling is the target's partial
(simpsons.files), so one left by a killed process is removed by the next unpack into the same target.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import json
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from simpsons.files import fresh_partial

ARCHIVE_SUFFIXES = (".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar", ".zip")
MAX_MEMBERS = 200_000  # the full Kaggle set has ~21k files
MAX_BYTES = 16 << 30  # 16 GiB unpacked; the full Kaggle set is ~1.2 GiB
MAX_FILE_BYTES = 64 << 20  # one member; the largest image of the Kaggle set is under 1 MB
UNREAD_LIST = ".unread.json"  # in the target: [{"path", "reason"}] for members over max_file_bytes
_CHUNK = 1 << 20  # bytes copied per read


class ArchiveError(ValueError):
    """An archive that is refused (unsafe) or cannot be read; the message names it and the member."""


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def safe_extract(
    archive: str | Path,
    target: str | Path,
    max_members: int = MAX_MEMBERS,
    max_bytes: int = MAX_BYTES,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Path:
    """Unpack `archive` into the folder `target` (which must not exist yet) and return it."""
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise ArchiveError(f"Cannot unpack {archive.name} into {target}: that folder already exists; remove it first.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = fresh_partial(target)
    partial.mkdir()
    try:
        budget = _Budget(archive, max_members, max_bytes, max_file_bytes)
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, partial, budget)
        else:
            _extract_tar(archive, partial, budget)
        if budget.unread:
            (partial / UNREAD_LIST).write_text(json.dumps(budget.unread, indent=1))
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# Member checks


def _safe_relpath(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path inside the target, or None for the archive's own root ('./')."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(
            f"Refusing {archive.name}: member '{name}' has an absolute path and would be written outside the target folder."
        )
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"Refusing {archive.name}: member '{name}' contains '..' and would be written outside the target folder."
        )
    return PurePosixPath(*parts) if parts else None


class _Budget:
    """Counts members and unpacked bytes against the limits; lists members too large to write."""

    def __init__(self, archive: Path, max_members: int, max_bytes: int, max_file_bytes: int):
        self.archive, self.max_members, self.max_bytes, self.max_file_bytes = (
            archive,
            max_members,
            max_bytes,
            max_file_bytes,
        )
        self.members = 0
        self.bytes = 0
        self.unread: list[dict] = []

    def too_large(self, rel: PurePosixPath | None, size: int) -> bool:
        """True (and listed) when a file member is over max_file_bytes: then it is not written."""
        if rel is None or size <= self.max_file_bytes:
            return False
        self.unread.append(
            {
                "path": rel.as_posix(),
                "size": size,
                "reason": (
                    f"{size / 2**20:,.1f} MiB in the archive, over the per-image limit of {self.max_file_bytes / 2**20:,.1f} MiB "
                    "(data.max_image_bytes); not unpacked"
                ),
            }
        )
        return True

    def add_member(self, name: str, size: int) -> None:
        # Skipped members count too: their bytes are still decompressed to pass them.
        self.members += 1
        if self.members > self.max_members:
            raise ArchiveError(
                f"Refusing {self.archive.name}: it has more than {self.max_members:,} members "
                "(a limit against archive bombs); unpack it yourself and pass the folder instead."
            )
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise ArchiveError(
                f"Refusing {self.archive.name}: it unpacks to more than {self.max_bytes / 2**30:.1f} GiB "
                f"(reached at member '{name}'), a limit against archive bombs; unpack it yourself and pass the folder instead."
            )


def _write_member(source: BinaryIO, dest: Path, size: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    remaining = size
    with open(dest, "wb") as out:
        while remaining > 0 and (block := source.read(min(_CHUNK, remaining))):
            out.write(block)
            remaining -= len(block)
    if remaining:
        raise ArchiveError(
            f"Archive member {dest.name} is truncated ({size - remaining} of {size} bytes); download the archive again."
        )


# ---------------------------------------------------------------------------------------------
# Formats


class _ProgressReader(io.RawIOBase):
    """A read-only file whose reads advance a progress bar (compressed bytes of the archive)."""

    def __init__(self, f: BinaryIO, bar):  # bar: a tqdm
        self.f, self.bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.bar.update(n)
        return n


def _decompressed(compressed: io.BufferedReader) -> BinaryIO:
    """The tar bytes inside a .tar.gz/.tar.bz2/.tar.xz (or a plain .tar), inflated a bounded block at a time.

    tarfile's own stream mode inflates each compressed block whole, and one block of a zero-filled
    member becomes tens of MB at once; these readers never hand out more than was asked. Each
    also reads concatenated streams, as gzip, bzip2 and xz allow.
    """
    magic = compressed.peek(6)[:6]
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=compressed)
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(compressed)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(compressed)
    return compressed


def _extract_tar(archive: Path, out: Path, budget: _Budget) -> None:
    from tqdm import tqdm  # imported where used: the config imports this module where tqdm is not (device check)

    with (
        open(archive, "rb") as raw,
        tqdm(
            total=archive.stat().st_size, unit="B", unit_scale=True, desc=f"unpack {archive.name}", mininterval=1.0
        ) as bar,
    ):
        try:
            # Stream mode ("r|"): one sequential pass, each member checked before it is written.
            tar_bytes = _decompressed(io.BufferedReader(_ProgressReader(raw, bar), _CHUNK))
            with tarfile.open(fileobj=tar_bytes, mode="r|", bufsize=_CHUNK) as tar:
                for member in tar:
                    _extract_tar_member(archive, tar, member, out, budget)
        except (tarfile.TarError, EOFError, OSError, ValueError, lzma.LZMAError, zlib.error) as exc:
            if isinstance(exc, ArchiveError):
                raise
            raise ArchiveError(
                f"Cannot read {archive.name} as a tar or zip archive ({exc}); download it again or check the file."
            ) from None


def _extract_tar_member(
    archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, out: Path, budget: _Budget
) -> None:
    rel = _safe_relpath(archive, member.name)
    _refuse_kind(archive, member.name, member.issym() or member.islnk(), not (member.isreg() or member.isdir()))
    budget.add_member(member.name, member.size if member.isreg() else 0)
    # A member left out: tarfile skips its data, block by block, on the way to the next member.
    _place_member(out, rel, member.isdir(), member.size, budget, functools.partial(tar.extractfile, member))


def _refuse_kind(archive: Path, name: str, link: bool, special: bool) -> None:
    """Links and device or special files are never unpacked: the whole archive is refused."""
    if link:
        raise ArchiveError(f"Refusing {archive.name}: member '{name}' is a link, and links are not allowed.")
    if special:
        raise ArchiveError(
            f"Refusing {archive.name}: member '{name}' is a device or special file, which is not allowed."
        )


def _place_member(
    out: Path, rel: PurePosixPath | None, is_dir: bool, size: int, budget: _Budget, open_data: Callable[[], BinaryIO]
) -> None:
    """A checked member under `out`: a folder is made; a file within the budget is written from `open_data()`."""
    if rel is None:
        return
    if is_dir:
        (out / rel).mkdir(parents=True, exist_ok=True)
        return
    if budget.too_large(rel, size):
        return
    with open_data() as source:
        _write_member(source, out / rel, size)


def _extract_zip(archive: Path, out: Path, budget: _Budget) -> None:
    from tqdm import tqdm  # see _extract_tar

    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            # The central directory lists every member up front: check them all before writing any.
            for info in infos:
                _safe_relpath(archive, info.filename)
                mode = info.external_attr >> 16
                special = bool(mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)))
                _refuse_kind(archive, info.filename, stat.S_ISLNK(mode), special)
                budget.add_member(info.filename, info.file_size)
            for info in tqdm(infos, desc=f"unpack {archive.name}", unit="file", mininterval=1.0):
                rel = _safe_relpath(archive, info.filename)
                _place_member(out, rel, info.is_dir(), info.file_size, budget, functools.partial(zf.open, info))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError) as exc:
        raise ArchiveError(
            f"Cannot read {archive.name} as a zip archive ({exc}); download it again or check the file."
        ) from None
