"""storage.py against a real S3 server (moto) on 127.0.0.1, over HTTP with boto3 and pyarrow."""

import multiprocessing
import os
from pathlib import Path

import boto3
import numpy as np
import pytest
from asserts import one_sentence
from s3_objects import clear_credentials, objects

from simpsons import storage
from simpsons.cluster import free_port
from simpsons.dataset import load_packed, local_dataset_dir, manifest_sha256, read_manifest
from simpsons.files import file_sha256
from simpsons.storage import StorageError

SECRET = "testing-secret-key"  # the conftest's; it must never show up in a message


def test_sync_sends_multipart_and_small_files_once(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 << 20)  # S3's smallest part size
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 << 20)
    rng = np.random.default_rng(0)
    files = {"big.npy": tmp_path / "big.npy", "a/one.jpg": tmp_path / "one.jpg", "a/two.jpg": tmp_path / "two.jpg"}
    files["big.npy"].write_bytes(rng.bytes(12 << 20))  # 3 parts
    files["a/one.jpg"].write_bytes(b"one")
    files["a/two.jpg"].write_bytes(b"two" * 1000)
    sha = {k: file_sha256(p) for k, p in files.items()}
    uri = f"s3://{bucket}/data/v1"

    assert storage.sync_files(files, uri, sha) == (3, sum(p.stat().st_size for p in files.values()))
    stored = objects(bucket)
    assert set(stored) == {"data/v1/big.npy", "data/v1/a/one.jpg", "data/v1/a/two.jpg"}
    assert stored["data/v1/big.npy"]["ETag"].strip('"').endswith("-3")  # really multipart
    assert storage.sync_files(files, uri, sha) == (0, 0)  # same bytes: nothing sent, big one known by its sha256

    files["a/two.jpg"].write_bytes(b"TWO" * 1000)  # same size, other bytes
    sha["a/two.jpg"] = file_sha256(files["a/two.jpg"])
    assert storage.sync_files(files, uri, sha) == (1, 3000)

    back = storage.download_dir(uri, tmp_path / "back")
    for key, path in files.items():
        assert (back / key).read_bytes() == path.read_bytes()
    fs, path = storage.pyarrow_filesystem(uri)  # what Ray Train uses sees the same objects
    assert fs.get_file_info(f"{path}/big.npy").size == 12 << 20


def test_upload_dir_overwrites_and_local_folders_work_too(bucket, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "x.txt").write_text("first")
    for dest in (f"s3://{bucket}/run/best", str(tmp_path / "local_dest")):
        storage.upload_dir(tmp_path / "src", dest)
        (tmp_path / "src" / "sub" / "x.txt").write_text("second")
        storage.upload_dir(tmp_path / "src", dest)
        assert storage.read_bytes(storage.join(dest, "sub/x.txt")) == b"second"
        (tmp_path / "src" / "sub" / "x.txt").write_text("first")


def test_missing_bucket_is_one_sentence(s3_server, tmp_path):
    with pytest.raises(StorageError) as err:
        storage.check_bucket("s3://no-such-bucket-here/prefix")
    assert str(err.value).startswith("Bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:")
    assert "aws s3 mb s3://no-such-bucket-here" in str(err.value) and one_sentence(str(err.value), SECRET)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="Bucket 'no-such-bucket-here' does not exist"):
        storage.upload_files({"f": tmp_path / "f"}, "s3://no-such-bucket-here/p")


def test_wrong_endpoint_is_one_sentence(s3_server):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StorageError) as err:
        storage.check_bucket("s3://any-bucket/x", endpoint=nobody)
    assert str(err.value).startswith(f"Cannot reach the S3 endpoint {nobody} for s3://any-bucket/x")
    assert "AWS_ENDPOINT_URL" in str(err.value) and one_sentence(str(err.value), SECRET)


def test_no_credentials_is_one_sentence(bucket, tmp_path, monkeypatch):
    clear_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find here
    with pytest.raises(StorageError) as err:
        storage.check_bucket(f"s3://{bucket}/p")
    assert str(err.value).startswith(f"No AWS credentials found for s3://{bucket}/p: set AWS_PROFILE")
    assert one_sentence(str(err.value), SECRET)


# ---------------------------------------------------------------------------------------------
# Packed datasets in S3 -> the node-local cache


def _fetch_in_child(uri: str, cache: str, barrier, calls) -> str:
    real = storage.download_files

    def counting(*args, **kwargs):  # observes the download; the real one still runs
        calls.put(os.getpid())
        return real(*args, **kwargs)

    storage.download_files = counting
    barrier.wait()  # all start together, so they really race for the lock
    return str(local_dataset_dir(uri, cache))


def test_dataset_is_downloaded_once_per_node_and_verified(bucket, packed_dataset, tmp_path):
    uri = f"s3://{bucket}/datasets/tiny/v1"
    with pytest.raises(StorageError, match=f"{uri} has no manifest.json: the dataset version is missing"):
        local_dataset_dir(uri, str(tmp_path / "cache"))
    storage.upload_dir(packed_dataset, uri)

    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier, calls = manager.Barrier(3), manager.Queue()
        with ctx.Pool(3) as pool:
            paths = pool.starmap(_fetch_in_child, [(uri, str(tmp_path / "cache"), barrier, calls)] * 3)
        downloads = calls.qsize()
    assert len(set(paths)) == 1 and downloads == 1  # three workers, one download
    local = Path(paths[0])
    assert read_manifest(local) == read_manifest(packed_dataset)
    images, labels = load_packed(local, "train")
    assert np.array_equal(images, load_packed(packed_dataset, "train")[0])
    # Provenance: the node's copy names the same data as the folder that was uploaded, and the
    # cache folder is named by that digest.
    assert manifest_sha256(local) == manifest_sha256(packed_dataset) == file_sha256(packed_dataset / "manifest.json")
    assert manifest_sha256(packed_dataset).startswith(local.name)

    # A damaged object is caught against the manifest's sha256, and nothing is marked complete.
    damaged = np.load(packed_dataset / "val_labels.npy")[::-1].copy()
    np.save(tmp_path / "val_labels.npy", damaged)
    boto3.client("s3").upload_file(str(tmp_path / "val_labels.npy"), bucket, "datasets/tiny/v1/val_labels.npy")
    with pytest.raises(StorageError, match="val_labels.npy does not match the sha256 in its manifest"):
        local_dataset_dir(uri, str(tmp_path / "other_cache"))
    assert not list((tmp_path / "other_cache" / "datasets").glob("*/manifest.json"))


def test_a_complete_copy_from_another_host_after_a_lost_race_counts_as_success(
    bucket, packed_dataset, tmp_path, monkeypatch
):
    """Two hosts sharing one cache folder (e.g. NFS, where the file lock does not reach across
    hosts): each downloads into its own per-host, per-process folder; the one that finishes
    second finds the other's complete copy in place and uses it."""
    import socket

    uri = f"s3://{bucket}/datasets/tiny/v1"
    storage.upload_dir(packed_dataset, uri)
    cache = tmp_path / "cache"
    real = storage.download_files
    partials = []

    def other_host_finishes_first(files, *args, **kwargs):
        real(files, *args, **kwargs)  # our own download completes...
        partial = Path(next(iter(files.values()))).parent
        partials.append(partial.name)
        # ...while the other host's copy (a whole packed dataset with its manifest) lands first.
        other = partial.with_name(partial.name + ".other-host")
        other.mkdir()
        for item in packed_dataset.iterdir():
            (other / item.name).write_bytes(item.read_bytes())
        os.replace(other, partial.parent / partial.name[1:].split(".partial-")[0])

    monkeypatch.setattr(storage, "download_files", other_host_finishes_first)
    local = local_dataset_dir(uri, str(cache))
    assert partials == [f".{local.name}.partial-{socket.gethostname()}-{os.getpid()}"]
    assert read_manifest(local) == read_manifest(packed_dataset)
    assert sorted(p.name for p in local.parent.iterdir()) == sorted([local.name, f"{local.name}.lock"])  # ours removed


def test_a_download_left_by_a_dead_process_is_taken_over_not_repeated(bucket, packed_dataset, tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    uri = f"s3://{bucket}/datasets/tiny/v1"
    storage.upload_dir(packed_dataset, uri)
    cache = tmp_path / "cache"
    first = local_dataset_dir(uri, str(cache))  # learn the key, then make it a half-done download
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = first.with_name(f".{first.name}.partial-{socket.gethostname()}-{int(dead.stdout)}")
    first.rename(left)
    (left / "manifest.json").unlink()
    (left / "val_images.npy").unlink()  # not yet fetched when its process died
    fetched = []
    real = storage.download_files
    monkeypatch.setattr(storage, "download_files", lambda files, *a, **k: (fetched.extend(files), real(files, *a, **k)))
    assert local_dataset_dir(uri, str(cache)) == first
    assert fetched == ["val_images.npy"]  # the verified files of the dead process's folder were kept
    assert not list(cache.glob("datasets/.*.partial-*"))
