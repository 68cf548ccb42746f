"""What a test's S3 bucket holds, read with boto3 (the tests' S3 server is tests/conftest.py's)."""

from __future__ import annotations

import boto3


def objects(bucket: str, prefix: str = "") -> dict[str, dict]:
    """Every object under `prefix`: key -> its listing entry (Size, ETag, LastModified, ...)."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}
