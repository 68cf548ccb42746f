"""One way to reach storage: local folders and s3://bucket/prefix URIs.

Ray Train gets a `pyarrow` filesystem from here; the job's own reads and writes of run outputs
go through `upload_dir` / `download_dir`. An S3-compatible endpoint (MinIO, R2, a test server)
comes from the config or the standard AWS_ENDPOINT_URL; credentials only ever come from the
standard AWS chain (environment, profile, instance role) and are never logged or stored.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *(p.strip("/") for p in parts)])


def endpoint_url(endpoint: str = "") -> str:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def pyarrow_filesystem(uri: str, endpoint: str = "") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local folder or an s3:// URI."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    endpoint = endpoint_url(endpoint)
    kwargs = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")


def upload_dir(local_dir: str | Path, uri: str, endpoint: str = "") -> None:
    """Copy a local folder's files to `uri` (a local folder or s3://...), overwriting."""
    fs, path = pyarrow_filesystem(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | Path, endpoint: str = "") -> Path:
    fs, path = pyarrow_filesystem(uri, endpoint)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)


def local_dataset_dir(uri: str, cache_dir: str = "~/.cache/simpsons", endpoint: str = "") -> Path:
    """A local folder holding the packed dataset at `uri` (local folders are used in place)."""
    if not is_s3(uri):
        return Path(uri).expanduser()
    raise NotImplementedError("Reading packed datasets from S3 arrives with the storage issue.")
