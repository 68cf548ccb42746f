"""Validation, splitting and upload of a dataset version, on test-written images and a real S3 server."""

import json
import shutil
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import boto3
import numpy as np
import pytest
from asserts import one_sentence
from job_scripts import run_job
from PIL import Image
from s3_objects import objects
from synthetic import draw_example, make_image_tree, write_zero_member_tar_xz

from simpsons import storage
from simpsons.data import CLASS_NAMES, DataError, load_image
from simpsons.dataset import local_dataset_dir, read_manifest
from simpsons.files import sha256_hex
from simpsons.prepare import build_dataset, near_duplicate_pairs, prepare_dataset, scan_tree, thumbnails
from simpsons.storage import StorageError


def get(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def unsplit_tree(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """Kaggle-style `<class>/*.jpg`, plus duplicates of both kinds and a class too small to split."""
    make_image_tree(root, per_split={"": per_class}, size=48, seed=seed, layout="flat")
    bart, lisa = root / "bart_simpson", root / "lisa_simpson"
    for i in range(4):  # byte-identical copies under other names
        shutil.copy(bart / f"pic_{i:04d}.jpg", bart / f"copy_{i}.jpg")
    for i in range(4):  # re-encoded at another quality and size: other bytes, the same picture
        with Image.open(lisa / f"pic_{i:04d}.jpg") as img:
            img.resize((44, 44)).save(lisa / f"reencoded_{i}.jpg", quality=60)
    gil = root / "gil"
    gil.mkdir()
    import random

    for i in range(3):
        draw_example(4, 48, random.Random(i)).save(gil / f"pic_{i}.jpg")
    return root


# ---------------------------------------------------------------------------------------------
# Validation and split (local, no S3)


def test_unsplit_tree_gets_a_seeded_stratified_split_without_duplicates_across(tmp_path):
    tree = scan_tree(unsplit_tree(tmp_path / "src"))
    assert set(tree.groups) == {"unsplit"}
    manifest = build_dataset(tree, tmp_path / "a", stored_size=32, workers=1, val_fraction=0.2, seed=1)
    sides = {name: set(manifest["splits"][name]["sources"]) for name in ("train", "val")}
    assert sides["train"].isdisjoint(sides["val"]) and len(sides["train"] | sides["val"]) == len(tree.records)

    # Byte-identical: no sha256 on both sides. Re-encoded: each pair on one side.
    sha = manifest["sources"]
    assert {sha[s] for s in sides["train"]}.isdisjoint({sha[s] for s in sides["val"]})
    for i in range(4):
        pair = {f"lisa_simpson/pic_{i:04d}.jpg", f"lisa_simpson/reencoded_{i}.jpg"}
        assert pair <= sides["train"] or pair <= sides["val"]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["split"]["duplicate_groups"] >= 8

    # Stratified: about 20 % of each splittable class in val; the tiny class whole in train, and said.
    val_counts = dict(zip(CLASS_NAMES, manifest["splits"]["val"]["class_counts"]))
    assert all(5 <= val_counts[c] <= 8 for c in ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson"))
    assert val_counts["gil"] == 0 and {r["class"] for r in report["small_classes_kept_in_train"]} == {"gil"}
    assert "too few to split" in report["small_classes_kept_in_train"][0]["reason"]

    # Seeded: the same seed gives the same split, another seed another.
    again = build_dataset(tree, tmp_path / "b", stored_size=32, workers=1, val_fraction=0.2, seed=1)
    other = build_dataset(tree, tmp_path / "c", stored_size=32, workers=1, val_fraction=0.2, seed=2)
    assert again["splits"]["val"]["sources"] == manifest["splits"]["val"]["sources"]
    assert set(other["splits"]["val"]["sources"]) != sides["val"]


def test_near_duplicates_are_reencodes_not_merely_similar_pictures(tmp_path):
    root = unsplit_tree(tmp_path / "src", per_class=6)
    lisa = root / "lisa_simpson"
    files = [
        lisa / "pic_0000.jpg",
        lisa / "reencoded_0.jpg",
        lisa / "pic_0001.jpg",
        lisa / "pic_0002.jpg",
        lisa / "reencoded_2.jpg",
        root / "bart_simpson" / "pic_0000.jpg",
    ]
    thumbs = thumbnails(np.stack([load_image(f.read_bytes(), 32) for f in files]))
    labels = np.array([0, 0, 0, 0, 0, 1])
    assert near_duplicate_pairs(thumbs, labels).tolist() == [[0, 1], [3, 4]]
    assert near_duplicate_pairs(thumbs, np.arange(6)).tolist() == []  # compared within a class only


def test_given_split_is_kept_and_cross_split_duplicates_are_noted(tmp_path):
    root = make_image_tree(tmp_path / "src", per_split={"train": 6, "val": 3}, size=32)
    base = root / "dataset"
    shutil.copy(base / "train/bart_simpson/pic_0000.jpg", base / "val/bart_simpson/same_as_train.jpg")
    with Image.open(base / "train/lisa_simpson/pic_0001.jpg") as img:
        img.save(base / "val/lisa_simpson/reencoded.jpg", quality=50)
    manifest = build_dataset(scan_tree(root), tmp_path / "out", stored_size=32, workers=1)
    assert all(s.startswith("dataset/val/") for s in manifest["splits"]["val"]["sources"])
    assert manifest["splits"]["val"]["images"] == 4 * 3 + 2
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "1 byte-identical image(s) appear in both train and val (as given by the source)" in report["notes"]
    assert any(
        n.startswith("1 near-identical image pair(s) (re-encodes or neighbouring video frames) straddle")
        for n in report["notes"]
    ), report["notes"]


# ---------------------------------------------------------------------------------------------
# Prepare into S3


def test_prepare_uploads_a_complete_version_and_reports_bad_files(bucket, tmp_path):
    root = make_image_tree(tmp_path / "src", per_split={"train": 5, "val": 3}, size=32)
    bart = root / "dataset" / "train" / "bart_simpson"
    (bart / "empty.jpg").write_bytes(b"")
    good = (bart / "pic_0000.jpg").read_bytes()
    (bart / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bart / "notes.jpg").write_text("these are my notes, not a picture")

    def prepare_v1():
        return prepare_dataset(
            str(root),
            f"s3://{bucket}/simpsons",
            "tiny",
            "v1",
            stored_size=32,
            workers=1,
            cache_dir=str(tmp_path / "cache"),
        )

    result = prepare_v1()
    prefix = "simpsons/datasets/tiny/v1/"
    assert result.uri == f"s3://{bucket}/{prefix}".rstrip("/") and result.images == 4 * 8
    stored = {k[len(prefix) :]: o for k, o in objects(bucket).items()}
    manifest = json.loads(get(bucket, prefix + "manifest.json"))
    # Every object is listed with its sha256, and matches it; the manifest names classes and counts.
    assert set(stored) == set(manifest["objects"]) | {"manifest.json"}
    for key, sha in manifest["objects"].items():
        assert sha256_hex(get(bucket, prefix + key)) == sha
    assert manifest["class_names"] == list(CLASS_NAMES) and manifest["splits"]["train"]["images"] == 20
    assert {"train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy", "report.json"} <= set(stored)
    assert "originals/dataset/train/bart_simpson/pic_0000.jpg" in stored
    # Bad files: reported with their reason, left out of the arrays and of originals/.
    report = json.loads(get(bucket, prefix + "report.json"))
    bad = {b["path"]: b["reason"] for b in report["bad_files"]["train"]}
    assert set(bad) == {f"dataset/train/bart_simpson/{n}" for n in ("empty.jpg", "truncated.jpg", "notes.jpg")}
    assert (
        "0 bytes" in bad["dataset/train/bart_simpson/empty.jpg"]
        and "cannot decode" in bad["dataset/train/bart_simpson/notes.jpg"]
    )
    assert not any("empty.jpg" in k or "notes.jpg" in k for k in stored)

    # Same inputs again: nothing is sent. Other inputs into the complete version: refused.
    before = {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket).items()}
    assert prepare_v1().files_sent == 0
    assert {k: (o["ETag"], o["LastModified"]) for k, o in objects(bucket).items()} == before
    (bart / "pic_0001.jpg").unlink()
    with pytest.raises(
        DataError, match="already holds a complete dataset made from other images or settings; pass a new --version"
    ):
        prepare_v1()


def test_every_problem_of_a_tree_is_named_in_one_error_and_nothing_is_stored(bucket, tmp_path):
    src = tmp_path / "src"  # Kaggle's layout: simpsons_dataset/<class>/ beside kaggle_simpson_testset/
    root = unsplit_tree(src / "simpsons_dataset", per_class=6)
    for name in ("bartman", "homer_jr", "krusty", "zz_top"):
        shutil.copytree(root / "bart_simpson", root / name)
    (root / "milhouse_van_houten").mkdir()  # a known class without images
    testset = src / "kaggle_simpson_testset"
    testset.mkdir()
    for name in ("bart_simpson_1.jpg", "nobody_3.jpg", "bart.jpg"):
        shutil.copy(root / "bart_simpson" / "pic_0000.jpg", testset / name)
    with pytest.raises(DataError) as err:
        prepare_dataset(str(src), f"s3://{bucket}/p", cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == (
        "The image tree has 4 unknown class folder(s) (not one of the 42 known classes): simpsons_dataset/bartman, "
        "simpsons_dataset/homer_jr, simpsons_dataset/krusty "
        "and 1 more; 2 test-set file(s) not named <class>_<number> with a known class: kaggle_simpson_testset/bart.jpg, "
        "kaggle_simpson_testset/nobody_3.jpg; 1 class folder(s) without images: simpsons_dataset/milhouse_van_houten; "
        "rename or remove "
        "them, or set data.classes=auto to use the tree's own class folders."
    )
    assert objects(bucket) == {}

    # Fixed: the empty class folder alone is a note in the report, not a failure.
    for name in ("bartman", "homer_jr", "krusty", "zz_top"):
        shutil.rmtree(root / name)
    (testset / "nobody_3.jpg").unlink()
    (testset / "bart.jpg").unlink()
    result = prepare_dataset(str(src), f"s3://{bucket}/p", stored_size=32, workers=1, cache_dir=str(tmp_path / "cache"))
    report = json.loads(get(bucket, "p/datasets/simpsons/v1/report.json"))
    assert "1 class folder(s) without images: simpsons_dataset/milhouse_van_houten: ignored" in report["notes"]
    assert result.images == len(list(src.rglob("*.jpg"))) + len(list(src.rglob("*.png")))


def _no_usable_train(root: Path) -> str:
    for path in (root / "dataset/train").rglob("pic_*"):
        path.write_bytes(b"this is not an image")
    return (
        "No dataset written: the training split has no usable image (20 image file(s) found, 12 left out, "
        "e.g. dataset/train/bart_simpson/pic_0000.jpg: cannot decode: not an image in a format this job reads "
        "(JPEG, PNG, BMP, GIF, WebP)); add decodable images to the class folders."
    )


def _empty_val(root: Path) -> str:
    for path in (root / "dataset/val").rglob("pic_*"):
        path.unlink()
    return (
        "No dataset written: the validation split is empty (12 image file(s) found, 0 left out); "
        "add images to the val/<class>/ folders."
    )


def _class_only_in_val(root: Path) -> str:
    shutil.copytree(root / "dataset/val/bart_simpson", root / "dataset/val/gil")
    return (
        "No dataset written: 1 class(es) have validation images but no training image (gil) (22 image file(s) "
        "found, 0 left out); add training images of them or remove them from val."
    )


@pytest.mark.parametrize("damage", [_no_usable_train, _empty_val, _class_only_in_val])
def test_nothing_is_published_that_training_could_not_use(bucket, tmp_path, damage):
    root = make_image_tree(tmp_path / "src", per_split={"train": 3, "val": 2}, size=32)
    expected = damage(root)
    with pytest.raises(DataError) as err:
        prepare_dataset(str(root), f"s3://{bucket}/p", stored_size=32, workers=1, cache_dir=str(tmp_path / "cache"))
    assert str(err.value) == expected
    assert objects(bucket) == {} and not list((tmp_path / "cache").rglob("manifest.json"))


def test_bad_files_are_reported_in_words_and_oversized_files_are_not_read(bucket, tmp_path):
    root = make_image_tree(tmp_path / "src", per_split={"train": 3, "val": 2}, size=32)
    bart = root / "dataset/train/bart_simpson"
    (bart / "notes.jpg").write_text("these are my notes, not a picture")
    good = (bart / "pic_0000.jpg").read_bytes()
    (bart / "half.jpg").write_bytes(good[: len(good) // 2])
    with open(bart / "huge.jpg", "wb") as f:  # sparse: 4 GiB that cost no disk; reading it would take seconds
        f.truncate(4 << 30)
    result = prepare_dataset(
        str(root), f"s3://{bucket}/p", stored_size=32, workers=1, cache_dir=str(tmp_path / "cache")
    )
    report = json.loads(get(bucket, "p/datasets/simpsons/v1/report.json"))
    reasons = {b["path"].split("/")[-1]: b["reason"] for files in report["bad_files"].values() for b in files}
    assert reasons["notes.jpg"] == "cannot decode: not an image in a format this job reads (JPEG, PNG, BMP, GIF, WebP)"
    assert reasons["huge.jpg"] == "4,096.0 MiB, over the per-image limit of 64.0 MiB (data.max_image_bytes); not read"
    assert report["bad_files"]["unread"] == [
        {"path": "dataset/train/bart_simpson/huge.jpg", "reason": reasons["huge.jpg"]}
    ]
    assert all(" at 0x" not in r and "<" not in r for r in reasons.values()), reasons
    assert result.images == 4 * 5


def test_job_exits_with_one_sentence_for_a_missing_bucket(s3_server, tmp_path):
    root = make_image_tree(tmp_path / "src", per_split={"train": 1, "val": 1}, size=16)
    done = run_job(
        "prepare_data.py",
        "--source",
        root,
        "--dest",
        "s3://not-a-bucket-yet/simpsons",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: Bucket 'not-a-bucket-yet' does not exist at {s3_server}; create it "
        "(aws s3 mb s3://not-a-bucket-yet) or fix the URI s3://not-a-bucket-yet/simpsons."
    )
    assert "Traceback" not in done.stderr


# Inflates 4 GiB of zeros to pass the member: ~20 s on 2 busy cores.
def test_archive_with_a_4_gib_image_is_refused_unread_and_nothing_is_published(bucket, tmp_path):
    archive = write_zero_member_tar_xz(tmp_path / "bomb.tar.xz", "dataset/train/bart_simpson/huge.jpg", 4 << 30)
    assert archive.stat().st_size < 1 << 20
    cache = tmp_path / "cache"
    done = run_job(
        "prepare_data.py",
        "--source",
        archive,
        "--dest",
        f"s3://{bucket}/p",
        "--set",
        f"data.cache_dir={cache}",
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: No images found under {cache}/unpacked/") and message.endswith(
        " (1 file(s) left out unread for their size, e.g. dataset/train/bart_simpson/huge.jpg (4,096.0 MiB in the "
        "archive, over the per-image limit of 64.0 MiB (data.max_image_bytes); not unpacked)): expected "
        "[dataset/]train/<class>/*.jpg (the original layout) or <class>/*.jpg (Kaggle's simpsons_dataset) within a "
        "few folders of it."
    ), message
    assert "Traceback" not in done.stderr and objects(bucket) == {}
    written = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert written < 1 << 20, written  # the member was never written to the cache


# ---------------------------------------------------------------------------------------------
# An S3 failure in the middle of an upload


class CuttingProxy:
    """A TCP proxy to the S3 server that, once `budget` request bytes have passed, drops every
    connection and stops listening: the S3 endpoint goes away in the middle of the upload."""

    def __init__(self, upstream: str, budget: int):
        self.upstream = (urlparse(upstream).hostname, urlparse(upstream).port)
        self.budget, self.sent, self.lock = budget, 0, threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
            except OSError:
                return
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, is_request):
        try:
            while data := src.recv(1 << 16):
                if is_request:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent > self.budget
                    if over:
                        self.close()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.cut.set()
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_upload_cut_in_the_middle_completes_on_rerun(bucket, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail within seconds once the endpoint is gone
    monkeypatch.setattr(storage, "FILE_ATTEMPTS", 1)
    root = make_image_tree(tmp_path / "src", per_split={"train": 10, "val": 4}, size=48)
    args = dict(source=str(root), dest=f"s3://{bucket}/p", stored_size=32, workers=1, cache_dir=str(tmp_path / "cache"))
    proxy = CuttingProxy(s3_server, budget=40_000)  # about a third of the version's bytes
    try:
        with pytest.raises(StorageError) as err:
            prepare_dataset(**args, endpoint=proxy.url)
    finally:
        proxy.close()
    assert one_sentence(str(err.value)) and proxy.url in str(err.value), str(err.value)
    partial = objects(bucket)
    assert "p/datasets/simpsons/v1/manifest.json" not in partial  # incomplete, and marked so
    with pytest.raises(StorageError, match="has no manifest.json"):
        local_dataset_dir(f"s3://{bucket}/p/datasets/simpsons/v1", str(tmp_path / "train_cache"))

    result = prepare_dataset(**args)
    complete = objects(bucket)
    manifest = json.loads(get(bucket, "p/datasets/simpsons/v1/manifest.json"))
    assert 0 < len(partial) < len(manifest["objects"])  # the cut really came in the middle
    assert len(complete) == len(manifest["objects"]) + 1
    assert result.files_sent == len(manifest["objects"]) - len(partial) + 1  # only what was missing, then the manifest
    assert read_manifest(local_dataset_dir(result.uri, str(tmp_path / "train_cache")))["fingerprint"]
