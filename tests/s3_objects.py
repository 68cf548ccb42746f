"""What a test's S3 bucket holds, read with boto3 (the tests' S3 server is tests/conftest.py's)."""

from __future__ import annotations

import boto3

# The environment variables botocore finds credentials (or a way to them) through; a test that
# wants none, or only an instance role, removes them all.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
)


def clear_credentials(monkeypatch, folder) -> None:
    """No credentials from the environment or from the user's files (pointed at absent ones in `folder`)."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "no-config"))


def objects(bucket: str, prefix: str = "", client=None) -> dict[str, dict]:
    """Every object under `prefix`: key -> its listing entry (Size, ETag, LastModified, ...); through
    `client`, or the environment's S3 endpoint."""
    pages = (client or boto3.client("s3")).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}
