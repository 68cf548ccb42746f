"""fetch_source on real files: local folders and archives, a real HTTP server on 127.0.0.1, Drive.

Only the gdown calls that would reach Google are replaced (by a copy of a local folder or
file); everything else runs for real.
"""

import hashlib
import http.server
import logging
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from synthetic import make_image_tree

from simpsons.prepare import scan_tree
from simpsons.sources import SourceError, fetch_source


@pytest.fixture(scope="module")
def drive_like_folder(tmp_path_factory) -> Path:
    """A folder holding only dataset.tar.xz, packed the way the published Drive folder is."""
    tmp = tmp_path_factory.mktemp("drive")
    images = make_image_tree(tmp / "images", per_split={"train": 3, "val": 2}, size=24)
    folder = tmp / "simpsons_dataset"
    folder.mkdir()
    with tarfile.open(folder / "dataset.tar.xz", "w:xz") as tar:
        tar.add(images / "dataset", arcname="dataset")
    return folder


def test_folder_holding_the_archive_is_unpacked_once(drive_like_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    tree = fetch_source(str(drive_like_folder), tmp_path / "cache")
    assert tree.parent == tmp_path / "cache" / "unpacked"
    assert len(list((tree / "dataset" / "train" / "bart_simpson").glob("*"))) == 3
    assert set(scan_tree(tree).groups) == {"train", "val"}
    marker = tree / "dataset" / "train" / "bart_simpson" / "pic_0000.jpg"
    mtime = marker.stat().st_mtime_ns
    assert fetch_source(drive_like_folder, tmp_path / "cache") == tree
    assert marker.stat().st_mtime_ns == mtime and "unpacked before" in caplog.text


def test_local_archive_and_file_url(drive_like_folder, tmp_path):
    archive = drive_like_folder / "dataset.tar.xz"
    from_path = fetch_source(archive, tmp_path / "cache")
    assert fetch_source(f"file://{archive}", tmp_path / "cache") == from_path
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert fetch_source(f"{archive}#sha256={digest}", tmp_path / "cache") == from_path
    with pytest.raises(SourceError, match="expected sha256"):
        fetch_source(f"{archive}#sha256={'0' * 64}", tmp_path / "cache")


def test_image_folder_is_used_in_place(tmp_path):
    root = make_image_tree(tmp_path / "tree", per_split={"train": 1}, size=16)
    assert fetch_source(root, tmp_path / "cache") == root.resolve()
    assert not (tmp_path / "cache").exists()


def test_kaggle_layout_is_found_with_its_flat_test_set(tmp_path):
    root = tmp_path / "kaggle"
    make_image_tree(root / "simpsons_dataset", per_split={"": 6}, size=16, layout="flat")
    test_dir = root / "kaggle_simpson_testset" / "kaggle_simpson_testset"
    test_dir.mkdir(parents=True)
    for i, name in enumerate(["bart_simpson", "lisa_simpson", "bart_simpson"]):
        shutil.copy(root / "simpsons_dataset" / name / "pic_0000.jpg", test_dir / f"{name}_{i}.jpg")
    tree = scan_tree(fetch_source(root, tmp_path / "cache"))
    assert set(tree.groups) == {"unsplit", "testset"}
    assert len(tree.groups["unsplit"]) == 4 * 6
    assert [r.relpath for r in tree.groups["testset"]][
        0
    ] == "kaggle_simpson_testset/kaggle_simpson_testset/bart_simpson_0.jpg"
    (test_dir / "bartman_7.jpg").write_bytes(b"x")
    with pytest.raises(
        Exception, match="1 test-set file\\(s\\) not named <class>_<number> with a known class: .*bartman_7.jpg;"
    ):
        scan_tree(root)


def test_bad_sources_are_one_sentence(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        fetch_source(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="not a .tar.xz/.tar.gz/.tar/.zip archive"):
        fetch_source(tmp_path / "notes.txt", tmp_path / "cache")
    with pytest.raises(SourceError, match="unsupported scheme 'ftp'"):
        fetch_source("ftp://example.org/x.zip", tmp_path / "cache")


def test_hostile_archive_in_the_source_folder_leaves_nothing_in_the_cache(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    with tarfile.open(folder / "dataset.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("dataset/../../escape.jpg")
        tar.addfile(info)
    with pytest.raises(SourceError, match="Refusing dataset.tar.gz: member 'dataset/../../escape.jpg' contains '..'"):
        fetch_source(folder, tmp_path / "cache")
    assert list((tmp_path / "cache" / "unpacked").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# http(s): a real server on 127.0.0.1 that honours Range requests


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    ranges_seen: list = []

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if header := self.headers.get("Range"):
            RangeHandler.ranges_seen.append(header)
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(drive_like_folder):
    handler = lambda *a, **k: RangeHandler(*a, directory=str(drive_like_folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    RangeHandler.ranges_seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_download_is_verified_cached_and_resumed(http_server, drive_like_folder, tmp_path):
    archive = drive_like_folder / "dataset.tar.xz"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    url = f"{http_server}/dataset.tar.xz"
    # A download killed halfway: the first half is on disk in the partial its process left.
    download_dir = tmp_path / "cache" / "downloads" / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    download_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = download_dir / f".dataset.tar.xz.partial-{socket.gethostname()}-{int(dead.stdout)}"
    left.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    tree = fetch_source(f"{url}#sha256={digest}", tmp_path / "cache")
    assert RangeHandler.ranges_seen == [f"bytes={archive.stat().st_size // 2}-"]  # it resumed, not restarted
    assert not list(download_dir.glob(".*.partial-*"))  # taken over, then renamed into place
    assert (download_dir / "dataset.tar.xz").read_bytes() == archive.read_bytes()
    assert set(scan_tree(tree).groups) == {"train", "val"}
    shutil.rmtree(tree)  # even without the unpacked copy, the verified download is not fetched again
    RangeHandler.ranges_seen = []
    assert fetch_source(url, tmp_path / "cache") == tree and RangeHandler.ranges_seen == []


def test_http_checksum_mismatch_and_missing_file(http_server, tmp_path):
    with pytest.raises(SourceError, match="does not have the expected sha256"):
        fetch_source(f"{http_server}/dataset.tar.xz#sha256={'a' * 64}", tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*dataset.tar.xz*"))  # the bad download is gone, partial too
    with pytest.raises(SourceError, match="server answered 404"):
        fetch_source(f"{http_server}/missing.zip", tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Google Drive through gdown


def test_drive_folder_downloads_once(drive_like_folder, tmp_path, monkeypatch):
    import gdown

    calls = []

    def local_copy(id, output, **kwargs):  # replaces the one call that would reach Google
        calls.append((id, kwargs.get("resume")))
        shutil.copytree(drive_like_folder, output, dirs_exist_ok=True)
        return [str(Path(output) / "dataset.tar.xz")]

    monkeypatch.setattr(gdown, "download_folder", local_copy)
    url = "https://drive.google.com/drive/folders/10ET4wN898yG2oiRshYxTH95p-Dpoor1S"
    tree = fetch_source(url, tmp_path / "cache")
    assert calls == [("10ET4wN898yG2oiRshYxTH95p-Dpoor1S", True)]
    assert set(scan_tree(tree).groups) == {"train", "val"}
    assert fetch_source(url, tmp_path / "cache") == tree and len(calls) == 1  # verified by size: not again
    # A damaged download (wrong size) is fetched again, with gdown resuming.
    download = tmp_path / "cache" / "downloads" / "drive-folder-10ET4wN898yG2oiRshYxTH95p-Dpoor1S" / "dataset.tar.xz"
    download.write_bytes(b"short")
    fetch_source(url, tmp_path / "cache")
    assert len(calls) == 2


def test_drive_file_link_and_failures(drive_like_folder, tmp_path, monkeypatch):
    import gdown

    def local_copy(id, output, **kwargs):  # replaces the one call that would reach Google
        if id == "private":
            raise gdown.exceptions.FileURLRetrievalError("Cannot retrieve the public link of the file.\nMore text")
        return shutil.copy(drive_like_folder / "dataset.tar.xz", output)

    monkeypatch.setattr(gdown, "download", local_copy)
    tree = fetch_source("https://drive.google.com/file/d/abcDEF123/view?usp=sharing", tmp_path / "cache")
    assert set(scan_tree(tree).groups) == {"train", "val"}
    with pytest.raises(SourceError) as err:
        fetch_source("https://drive.google.com/uc?id=private", tmp_path / "cache")
    assert str(err.value).startswith("Could not download Google Drive file private (Cannot retrieve the public link")
    assert "\n" not in str(err.value)
