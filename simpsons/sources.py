"""Raw data sources -> a local folder holding the image tree.

`fetch_source(source, cache_dir)` accepts
  - a Google Drive folder or file URL (downloaded with gdown; the published folder holds
    `dataset.tar.xz`),
  - an http(s) URL of an archive (append `#sha256=<hex>` to have it verified),
  - a local archive (.tar.xz, .tar.gz, .tar, .zip) or a `file://` URL of one,
  - a local folder: used in place when it holds an image tree, or, when it holds only
    archives (like the Drive folder), each archive is unpacked.

The image tree itself may be in the original layout (`[dataset/]{train,val,testset}/<class>/`)
or Kaggle's (`simpsons_dataset/<class>/*.jpg` with no split, and a flat
`kaggle_simpson_testset/<class>_<n>.jpg`); `simpsons.prepare` reads either.

Downloads and unpacked archives live in `cache_dir`, keyed by what they came from (URL, Drive
id, archive sha256). A download goes to its partial (simpsons.files) first and is renamed when
its size (and sha256, when known) checks out, so a download interrupted, even by a kill, resumes
(or restarts when the server cannot resume) and a finished one is never fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from simpsons.archive import MAX_FILE_BYTES, ArchiveError, is_archive, safe_extract
from simpsons.errors import UserError
from simpsons.files import cache_key, file_sha256, fresh_partial, resumed_partial
from simpsons.names import CACHE_DIR

_logger = logging.getLogger(__name__)

_DRIVE_FOLDER = re.compile(r"drive\.google\.com/drive/(?:u/\d+/)?folders/([\w-]+)")
_DRIVE_FILE = re.compile(r"(?:drive|docs)\.google\.com/(?:file/d/([\w-]+)|(?:open|uc)\?(?:.*&)?id=([\w-]+))")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SourceError(UserError, ValueError):
    """A data source that cannot be fetched or read; the message names it and the fix."""


def fetch_source(
    source: str | Path,
    cache_dir: str | Path = CACHE_DIR,
    sha256: str = "",
    max_image_bytes: int = MAX_FILE_BYTES,
) -> Path:
    """A local folder holding the images `source` names; downloads and unpacks into `cache_dir`.

    Archive members over `max_image_bytes` are not unpacked (see archive.safe_extract).
    """
    source, sha256 = check_source(source, sha256)
    cache = Path(cache_dir).expanduser()
    try:
        if match := _DRIVE_FOLDER.search(source):
            return _local(_drive_folder(match.group(1), cache), cache, max_image_bytes)
        if match := _DRIVE_FILE.search(source):
            return _local(_drive_file(match.group(1) or match.group(2), cache, sha256), cache, max_image_bytes)
        if urlparse(source).scheme in ("http", "https"):
            return _local(_http_file(source, cache, sha256), cache, max_image_bytes)
        path = _local_path(source)
        if sha256 and path.is_file() and file_sha256(path) != sha256:
            raise SourceError(
                f"Data source {path} does not have the expected sha256 {sha256}; the file is corrupt or a different version."
            )
        return _local(path, cache, max_image_bytes)
    except ArchiveError as exc:
        raise SourceError(str(exc)) from None


def check_source(source: str | Path, sha256: str = "") -> tuple[str, str]:
    """What can be said of a source without fetching it (empty, bad scheme or checksum, a local
    path that does not exist); jobs call it before Ray starts. Returns (source, expected sha256)."""
    source = str(source).strip()
    if not source:
        raise SourceError(
            "No data source given; pass a folder, an archive, an http(s) URL or a Google Drive link (--source / data.source)."
        )
    source, sha256 = _split_sha256(source, sha256)
    if not _is_remote(source):
        path = _local_path(source)
        if not path.exists():
            raise SourceError(
                f"Data source {path} does not exist; pass an existing folder or archive, an http(s) URL or a Google Drive link."
            )
    return source, sha256


def _is_remote(source: str) -> bool:
    """Drive links (with or without https://) and http(s) URLs."""
    return bool(_DRIVE_FOLDER.search(source) or _DRIVE_FILE.search(source)) or urlparse(source).scheme in (
        "http",
        "https",
    )


def _local_path(source: str) -> Path:
    scheme = urlparse(source).scheme
    if scheme == "file":
        source = unquote(urlparse(source).path)
    elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise SourceError(
            f"Data source {source!r} has an unsupported scheme '{scheme}'; pass a folder, an archive, an http(s) URL or a Google Drive link."
        )
    return Path(source).expanduser()


def _split_sha256(source: str, sha256: str) -> tuple[str, str]:
    """Take a `#sha256=<hex>` suffix off the source; it is the expected checksum of the file."""
    base, _, fragment = source.partition("#sha256=")
    sha256 = (fragment or sha256).lower()
    if sha256 and not _SHA256.match(sha256):
        raise SourceError(f"Expected sha256 {sha256!r} is not 64 hex digits; copy it again.")
    return base, sha256


# ---------------------------------------------------------------------------------------------
# Local folders and archives


def _local(path: Path, cache: Path, max_image_bytes: int) -> Path:
    """The image tree at a local path: a folder used in place, or its archive(s) unpacked."""
    path = path.resolve()
    if path.is_file():
        if not is_archive(path):
            raise SourceError(
                f"Data source {path} is a file but not a .tar.xz/.tar.gz/.tar/.zip archive; pass an archive or a folder."
            )
        return _unpack([path], cache, max_image_bytes)
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    archives = [p for p in sorted(path.iterdir()) if p.is_file() and is_archive(p)]
    if archives and not subdirs:
        return _unpack(archives, cache, max_image_bytes)  # e.g. the Drive folder: just dataset.tar.xz
    if not subdirs:
        raise SourceError(
            f"Data source {path} holds neither image folders nor an archive; pass the folder with train/ (or <class>/) folders, or one holding dataset.tar.xz."
        )
    return path


def _unpack(archives: list[Path], cache: Path, max_image_bytes: int) -> Path:
    """Unpack archives once into cache/unpacked/<sha256 of their contents>/ (one subfolder each when several)."""
    digests = [file_sha256(a) for a in archives]
    key = cache_key("|".join([*digests, str(max_image_bytes)]))
    target = cache / "unpacked" / key
    if target.is_dir():
        _logger.info("Using %s (unpacked before from %s)", target, ", ".join(a.name for a in archives))
        return target
    if len(archives) == 1:
        safe_extract(archives[0], target, max_file_bytes=max_image_bytes)
    else:
        partial = fresh_partial(target)
        for archive in archives:
            safe_extract(archive, partial / _stem(archive), max_file_bytes=max_image_bytes)
        os.replace(partial, target)
    _logger.info("Unpacked %s into %s", ", ".join(a.name for a in archives), target)
    return target


def _stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.xz", ".tar.gz", ".tar.bz2", ".txz", ".tgz", ".tbz2", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------
# Google Drive (gdown)


def _drive_folder(folder_id: str, cache: Path) -> Path:
    """Download a Drive folder once; a marker listing every file's size says it is complete."""
    out = cache / "downloads" / f"drive-folder-{folder_id}"
    marker = out.with_name(out.name + ".complete.json")
    if _marker_ok(marker, out):
        _logger.info("Using %s (downloaded before from Google Drive)", out)
        return out
    import gdown

    out.mkdir(parents=True, exist_ok=True)
    _logger.info("Downloading Google Drive folder %s into %s", folder_id, out)
    try:
        # resume=True: finished files are skipped and partial ones continued after an interruption.
        files = gdown.download_folder(
            id=folder_id, output=str(out), quiet=False, resume=True, retries=3, timeout=(30, 120)
        )
    except Exception as exc:  # gdown raises its own and requests' errors; all mean "could not download"
        raise SourceError(
            f"Could not download Google Drive folder {folder_id} ({_first_line(exc)}); check the link is public and that this machine reaches drive.google.com."
        ) from None
    if not files:
        raise SourceError(
            f"Google Drive folder {folder_id} is empty or not public; share it as 'anyone with the link' or pass another source."
        )
    _write_marker(marker, out, [Path(f) for f in files])
    return out


def _drive_file(file_id: str, cache: Path, sha256: str) -> Path:
    out_dir = cache / "downloads" / f"drive-file-{file_id}"
    marker = out_dir.with_name(out_dir.name + ".complete.json")
    if _marker_ok(marker, out_dir):
        return next(p for p in out_dir.iterdir() if p.is_file())
    import gdown

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Output ending in "/" keeps Drive's file name (the suffix tells the archive type).
        path = gdown.download(
            id=file_id, output=str(out_dir) + os.sep, quiet=False, resume=True, retries=3, timeout=(30, 120)
        )
    except Exception as exc:  # see _drive_folder
        raise SourceError(
            f"Could not download Google Drive file {file_id} ({_first_line(exc)}); check the link is public and that this machine reaches drive.google.com."
        ) from None
    if not path:
        raise SourceError(f"Google Drive file {file_id} could not be downloaded; check the link is public.")
    path = Path(path)
    if sha256 and file_sha256(path) != sha256:
        path.unlink()
        raise SourceError(
            f"Google Drive file {file_id} does not have the expected sha256 {sha256}; it was deleted, run again to re-download."
        )
    _write_marker(marker, out_dir, [path])
    return path


def _write_marker(marker: Path, root: Path, files: list[Path]) -> None:
    sizes = {p.resolve().relative_to(root.resolve()).as_posix(): p.stat().st_size for p in files}
    marker.write_text(json.dumps(sizes, indent=1))


def _marker_ok(marker: Path, root: Path) -> bool:
    """True when every file the marker lists is there with its size (a cheap verification)."""
    if not marker.is_file():
        return False
    sizes = json.loads(marker.read_text())
    return bool(sizes) and all(
        (root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in sizes.items()
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# http(s)


def _http_file(url: str, cache: Path, sha256: str, attempts: int = 4) -> Path:
    """Download `url` into the cache once, resuming a partial download (HTTP Range) when possible."""
    import requests

    name = Path(unquote(urlparse(url).path)).name or "download"
    out_dir = cache / "downloads" / f"url-{cache_key(url)}"
    dest = out_dir / name
    checked = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and checked.is_file() and (not sha256 or checked.read_text().strip() == sha256):
        _logger.info("Using %s (downloaded before from %s)", dest, url)
        return dest
    out_dir.mkdir(parents=True, exist_ok=True)
    part = resumed_partial(dest)
    for attempt in range(1, attempts + 1):
        try:
            _http_get(requests, url, part, desc=f"download {name}")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == attempts:
                raise SourceError(
                    f"Could not download {url} after {attempts} attempts ({_first_line(exc)}); check the URL and the network, then run again to resume."
                ) from None
            wait = 2**attempt
            _logger.warning("Download of %s interrupted (%s); resuming in %d s", url, _first_line(exc), wait)
            time.sleep(wait)
        except requests.HTTPError as exc:
            raise SourceError(
                f"Could not download {url}: the server answered {exc.response.status_code}; check the URL."
            ) from None
    digest = file_sha256(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise SourceError(
            f"Download of {url} does not have the expected sha256 {sha256}; it was deleted, run again to re-download."
        )
    os.replace(part, dest)
    checked.write_text(digest)
    return dest


def _http_get(requests, url: str, part: Path, desc: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, stream=True, headers=headers, timeout=(10, 60)) as response:
        if have and response.status_code == 416:
            # Range not satisfiable: the part is already whole (or longer than the file); restart to be sure.
            part.unlink()
            return _http_get(requests, url, part, desc)
        response.raise_for_status()
        if have and response.status_code != 206:
            have = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with (
            open(part, "ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=desc, mininterval=1.0) as bar,
        ):
            for block in response.iter_content(1 << 20):
                f.write(block)
                bar.update(len(block))
    if total is not None and part.stat().st_size != total:
        raise requests.exceptions.ChunkedEncodingError(f"got {part.stat().st_size} of {total} bytes")
