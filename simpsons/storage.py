"""One way to reach storage: local folders and s3://bucket/prefix URIs.

Ray Train gets a `pyarrow` filesystem from here (`pyarrow_filesystem`); everything the job itself
sends or fetches goes through boto3 (`upload_files`, `download_files`, `upload_dir`,
`download_dir`): multipart for large files, many files in parallel, botocore's retries with
exponential backoff plus a few more per file, and a progress bar in bytes.

An S3-compatible endpoint (MinIO, R2, a test server) comes from the config (`run.s3_endpoint`)
or the standard AWS_ENDPOINT_URL(_S3); credentials only ever come from the standard AWS chain
(environment, profile, instance role) and are never logged or stored. Failures that a user can
fix (no bucket, no credentials, wrong endpoint) raise StorageError
with one sentence saying what and how.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from simpsons.errors import UserError
from simpsons.files import file_md5, file_sha256, sha256_hex, write_atomic

_logger = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 << 20  # bytes; larger files go up in parts of MULTIPART_CHUNK
MULTIPART_CHUNK = 16 << 20
PARALLEL_FILES = 16  # files in flight at once (small images: latency-bound, not bandwidth-bound)
FILE_ATTEMPTS = 3  # whole-file attempts on top of botocore's per-request retries
# Tries per S3 request (botocore and pyarrow): with standard backoff, 10 ride out about 20 s of an
# unreachable endpoint (a restart of the store); 3, pyarrow's default, fail within 3 s.
REQUEST_ATTEMPTS = 10
QUIET_BELOW = 32 << 20  # bytes; smaller transfers (e.g. TensorBoard logs every epoch) draw no progress bar
# One INFO line per client ("Found credentials in environment variables") is noise in job logs.
logging.getLogger("botocore.credentials").setLevel(logging.WARNING)


class StorageError(UserError, OSError):
    """Object storage that cannot be used as asked; the message names the bucket/URI and the fix."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *(p.strip("/") for p in parts)])


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix")."""
    bucket, _, key = str(uri)[len("s3://") :].partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"{uri!r} is not an S3 URI; write it as s3://bucket/prefix.")
    return bucket, key.strip("/")


def endpoint_url(endpoint: str = "") -> str:
    return endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")


def pyarrow_filesystem(uri: str, endpoint: str = ""):
    """(pyarrow filesystem, path inside it) for a local folder or an s3:// URI."""
    # pyarrow is imported here, not at the top: the training engine and the device check import
    # this module (weights, checkpoints) on machines that have torch but no pyarrow (bench/device_check.py).
    import pyarrow.fs as pafs

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
    return _retrying_s3_class()(request_attempts(), **kwargs), uri[len("s3://") :].rstrip("/")


def request_attempts() -> int:
    """Tries per S3 request, the first included: the standard AWS_MAX_ATTEMPTS, else REQUEST_ATTEMPTS."""
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or REQUEST_ATTEMPTS)


def _rebuild_s3(options: dict):
    return _retrying_s3_class()(**options)


@functools.cache
def _retrying_s3_class():
    """pyarrow's S3 filesystem with AWS standard retries (exponential backoff) that survive pickling.

    Ray sends the run's filesystem to its controller and every worker; pyarrow's own pickling
    drops the retry strategy, which leaves 3 tries (about 3 s against an endpoint that is down).
    The options never hold credentials: each process takes them from the AWS chain. Made on first
    use, so that importing this module needs no pyarrow.
    """
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __init__(self, attempts: int = 0, **options):
            attempts = attempts or request_attempts()
            super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
            self._options = {"attempts": attempts, **options}

        def __reduce__(self):
            return _rebuild_s3, (self._options,)

    return RetryingS3FileSystem


# ---------------------------------------------------------------------------------------------
# boto3 client and errors


def s3_client(endpoint: str = "", max_attempts: int = 0, connect_timeout: float = 10.0):
    """A boto3 S3 client for the endpoint (or AWS), with retries in botocore's standard mode.

    Standard mode retries throttling, 5xx and connection errors with exponential backoff and
    jitter (up to 20 s between tries); `max_attempts` counts the first try (default:
    request_attempts()).
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts or request_attempts()},
        connect_timeout=connect_timeout,
        read_timeout=60,
        max_pool_connections=PARALLEL_FILES * 2,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(endpoint) or None, config=config)


def _where(endpoint: str) -> str:
    return endpoint_url(endpoint) or "AWS"


def explain(exc: BaseException, uri: str, endpoint: str = "") -> StorageError:
    """The one-sentence StorageError for a boto3/botocore failure on `uri`."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    where = _where(endpoint)
    bucket = split_uri(uri)[0] if is_s3(uri) else uri
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"No AWS credentials found for {uri}: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY), or run where an instance role grants access."
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return StorageError(
            f"Cannot reach the S3 endpoint {where} for {uri}; check AWS_ENDPOINT_URL or run.s3_endpoint "
            "(scheme, host and port) and that the server is running."
        )
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"The S3 endpoint {where} stopped answering while working on {uri}; run again to continue.")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code == "404" and exc.operation_name == "HeadBucket"):
            return StorageError(
                f"Bucket '{bucket}' does not exist at {where}; create it (aws s3 mb s3://{bucket}) or fix the URI {uri}."
            )
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
            "InvalidToken",
            "AuthorizationHeaderMalformed",
        ):
            return StorageError(
                f"{where} rejected the AWS credentials ({code}) for {uri}; check AWS_PROFILE or the access keys."
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"Access to {uri} is denied at {where}; give these credentials s3:ListBucket, s3:GetObject "
                "and s3:PutObject on the bucket."
            )
        if code in ("NoSuchKey", "404"):
            return StorageError(f"{uri} does not exist at {where}; check the URI.")
        return StorageError(
            f"S3 request for {uri} at {where} failed ({code or status}: {error.get('Message', '')}); check the endpoint and run again."
        )
    return StorageError(
        f"S3 transfer for {uri} at {where} failed ({type(exc).__name__}: {exc}); run again to continue."
    )


def _s3_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def check_bucket(uri: str, endpoint: str = "") -> None:
    """Fail fast, in one sentence, when the bucket is missing, unreachable or not ours."""
    bucket, _ = split_uri(uri)
    # Few retries: a wrong endpoint or missing bucket should be said in seconds, not minutes.
    client = s3_client(endpoint, max_attempts=2, connect_timeout=5)
    try:
        client.head_bucket(Bucket=bucket)
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None


def check_writable(uri: str, endpoint: str = "") -> None:
    """Fail fast, in one sentence, when a run could not store its checkpoints at `uri`.

    For s3:// the endpoint must answer, the bucket exist and a probe object be written and
    deleted; for a local folder it must be creatable and writable. Checked before Ray starts,
    so a wrong bucket or endpoint is said in seconds instead of by Ray's controller later.
    """
    probe_name = f".write-check-{uuid.uuid4().hex[:12]}"
    if not is_s3(uri):
        folder = Path(uri).expanduser()
        created = [p for p in [folder, *folder.parents] if not p.exists()]  # deepest first
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / probe_name).write_bytes(b"")
            (folder / probe_name).unlink()
            for path in created:  # a check leaves nothing behind; the run makes the folder again
                path.rmdir()
        except OSError as exc:
            raise StorageError(
                f"Cannot write to the run storage folder {folder} ({exc.strerror or exc}); "
                "fix its permissions or point run.storage elsewhere."
            ) from None
        return
    check_bucket(uri, endpoint)
    bucket, prefix = split_uri(uri)
    key = f"{prefix}/{probe_name}" if prefix else probe_name
    client = s3_client(endpoint, max_attempts=2, connect_timeout=5)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
        client.delete_object(Bucket=bucket, Key=key)
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None


# ---------------------------------------------------------------------------------------------
# Listing and transfers


@dataclass
class RemoteObject:
    size: int
    etag: str  # without quotes; the MD5 of the bytes for single-part uploads, "<md5>-<parts>" otherwise


def list_objects(uri: str, endpoint: str = "", client=None) -> dict[str, RemoteObject]:
    """Every object under an s3:// prefix (or file under a folder): {key relative to uri: RemoteObject}."""
    if not is_s3(uri):
        root = Path(uri).expanduser()
        if not root.is_dir():
            return {}
        return {
            p.relative_to(root).as_posix(): RemoteObject(p.stat().st_size, "") for p in root.rglob("*") if p.is_file()
        }
    bucket, prefix = split_uri(uri)
    client = client or s3_client(endpoint)
    found = {}
    start = f"{prefix}/" if prefix else ""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for item in page.get("Contents", []):
                found[item["Key"][len(start) :]] = RemoteObject(item["Size"], item["ETag"].strip('"'))
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None
    return found


def read_bytes(uri: str, endpoint: str = "") -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        return path.read_bytes() if path.is_file() else None
    from botocore.exceptions import ClientError

    bucket, key = split_uri(uri)
    try:
        return s3_client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise explain(exc, uri, endpoint) from None
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None


def write_bytes(data: bytes, uri: str, endpoint: str = "") -> None:
    if not is_s3(uri):
        path = Path(uri).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return
    bucket, key = split_uri(uri)
    try:
        s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=data, Metadata={"sha256": sha256_hex(data)})
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None


def move(uri: str, dest: str, endpoint: str = "") -> None:
    """Move every object under `uri` to `dest` (same bucket or filesystem): a rename for a folder;
    on S3 every object is copied before any is deleted, so an interrupted move loses nothing."""
    if not is_s3(uri):
        Path(uri).expanduser().rename(Path(dest).expanduser())
        return
    client = s3_client(endpoint)
    keys = list(list_objects(uri, endpoint, client))
    (bucket, prefix), (dest_bucket, dest_prefix) = split_uri(uri), split_uri(dest)
    try:
        for key in keys:
            source = {"Bucket": bucket, "Key": f"{prefix}/{key}"}
            client.copy(source, dest_bucket, f"{dest_prefix}/{key}", Config=_transfer_config())
        for start in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a call
            batch = [{"Key": f"{prefix}/{key}"} for key in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    except _s3_errors() as exc:
        raise explain(exc, uri, endpoint) from None


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # Parts of one large file go up on a few threads; PARALLEL_FILES files run side by side.
    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=4,
        use_threads=True,
    )


def upload_files(
    files: dict[str, str | Path],
    uri: str,
    endpoint: str = "",
    sha256: dict[str, str] | None = None,
    desc: str = "upload",
    workers: int = PARALLEL_FILES,
) -> int:
    """Send {key relative to uri: local path} to `uri`, in parallel; returns the bytes sent.

    Each object carries its sha256 as metadata (x-amz-meta-sha256) when given, so a later run can
    tell an identical object from a different one even when its ETag is not an MD5.
    """
    if not files:
        return 0
    sha256 = sha256 or {}
    total = sum(Path(p).stat().st_size for p in files.values())
    from tqdm import tqdm  # not at the top: see pyarrow_filesystem

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=1.0, disable=total < QUIET_BELOW) as bar:
        if not is_s3(uri):
            root = Path(uri).expanduser()
            for key, path in files.items():
                dest = root / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
                bar.update(Path(path).stat().st_size)
            return total
        bucket, prefix = split_uri(uri)
        client, config = s3_client(endpoint), _transfer_config()

        def send(key: str, path: Path) -> None:
            extra = {"Metadata": {"sha256": sha256[key]}} if key in sha256 else {}
            object_key = f"{prefix}/{key}" if prefix else key
            sent = [0]  # bytes of this file on the bar: taken back when an attempt fails

            def progress(n: int) -> None:
                sent[0] += n
                bar.update(n)

            def attempt() -> None:
                bar.update(-sent[0])
                sent[0] = 0
                if path.stat().st_size < MULTIPART_THRESHOLD:
                    # One PUT: a third of upload_file's overhead for the many small images.
                    client.put_object(Bucket=bucket, Key=object_key, Body=path.read_bytes(), **extra)
                    progress(path.stat().st_size)
                else:
                    client.upload_file(str(path), bucket, object_key, ExtraArgs=extra, Config=config, Callback=progress)

            _retrying(attempt, join(uri, key), endpoint)

        _run_parallel(send, files, workers)
    return total


def sync_files(
    files: dict[str, str | Path], uri: str, sha256: dict[str, str], endpoint: str = "", desc: str = "upload"
) -> tuple[int, int]:
    """Upload only what `uri` does not already hold with the same bytes; returns (files sent, bytes sent).

    One listing of the prefix gives every object's size and ETag; a same-size object is the same
    when its ETag is the local file's MD5 (single-part uploads), or else when its sha256 metadata
    matches (multipart uploads, whose ETag is not an MD5).
    """
    client = s3_client(endpoint) if is_s3(uri) else None
    remote = list_objects(uri, endpoint, client)
    todo = {
        key: Path(path)
        for key, path in files.items()
        if not _same(key, Path(path), sha256[key], remote.get(key), uri, endpoint, client)
    }
    if len(todo) < len(files):
        _logger.info(
            "%d of %d files already at %s with the same content; not sent again",
            len(files) - len(todo),
            len(files),
            uri,
        )
    return len(todo), upload_files(todo, uri, endpoint, sha256, desc)


def _same(key: str, path: Path, sha256: str, remote: RemoteObject | None, uri: str, endpoint: str, client) -> bool:
    if remote is None or remote.size != path.stat().st_size:
        return False
    if not is_s3(uri):
        return file_sha256(Path(uri).expanduser() / key) == sha256
    if remote.etag and "-" not in remote.etag:
        return file_md5(path) == remote.etag
    bucket, prefix = split_uri(uri)
    try:
        head = client.head_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key)
    except _s3_errors() as exc:
        raise explain(exc, join(uri, key), endpoint) from None
    return head.get("Metadata", {}).get("sha256") == sha256


def download_files(
    files: dict[str, str | Path], uri: str, endpoint: str = "", desc: str = "download", workers: int = PARALLEL_FILES
) -> None:
    """Fetch {key relative to uri: local path} from `uri`, in parallel."""
    if not files:
        return
    if not is_s3(uri):
        for key, path in files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(uri).expanduser() / key, path)
        return
    bucket, prefix = split_uri(uri)
    client, config = s3_client(endpoint), _transfer_config()
    sizes = {k: o.size for k, o in list_objects(uri, endpoint, client).items() if k in files}
    missing = sorted(set(files) - set(sizes))
    if missing:
        raise StorageError(
            f"{join(uri, missing[0])} does not exist ({len(missing)} object(s) missing); the data there is incomplete, prepare it again."
        )
    total = sum(sizes.values())
    from tqdm import tqdm  # not at the top: see pyarrow_filesystem

    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, mininterval=1.0, disable=total < QUIET_BELOW) as bar:

        def fetch(key: str, path: Path) -> None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            object_key = f"{prefix}/{key}" if prefix else key
            _retrying(
                lambda: client.download_file(bucket, object_key, str(path), Config=config, Callback=bar.update),
                join(uri, key),
                endpoint,
            )

        _run_parallel(fetch, files, workers)


def _retrying(transfer, uri: str, endpoint: str) -> None:
    """transfer() up to FILE_ATTEMPTS times, backing off between tries; a failure that is the last, or
    that no retry can fix, is raised as the StorageError for `uri`."""
    for attempt in range(1, FILE_ATTEMPTS + 1):
        try:
            return transfer()
        except _s3_errors() as exc:
            if attempt == FILE_ATTEMPTS or not _retryable(exc):
                raise explain(exc, uri, endpoint) from None
            time.sleep(2**attempt)


def _retryable(exc: BaseException) -> bool:
    """Worth another whole-file attempt: not a missing bucket, bad credentials or a denied request."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return False
    cause = exc.__context__ if not isinstance(exc, ClientError) and isinstance(exc.__context__, ClientError) else exc
    if isinstance(cause, ClientError):
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status in (408, 429)
    return True


def _run_parallel(fn, files: dict[str, str | Path], workers: int) -> None:
    """fn(key, path) for every file on `workers` threads; the first error stops the rest and is raised."""
    with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
        futures = [pool.submit(fn, key, Path(path)) for key, path in files.items()]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def upload_dir(local_dir: str | Path, uri: str, endpoint: str = "") -> None:
    """Copy a local folder's files to `uri` (a local folder or s3://...), overwriting."""
    local_dir = Path(local_dir)
    files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    if not is_s3(uri):
        Path(uri).expanduser().mkdir(parents=True, exist_ok=True)
    upload_files(files, uri, endpoint, desc=f"upload {local_dir.name}")


def download_dir(uri: str, local_dir: str | Path, endpoint: str = "") -> Path:
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(Path(uri).expanduser(), local_dir, dirs_exist_ok=True)
        return local_dir
    keys = list_objects(uri, endpoint)
    download_files({key: local_dir / key for key in keys}, uri, endpoint, desc=f"download {local_dir.name}")
    return local_dir
