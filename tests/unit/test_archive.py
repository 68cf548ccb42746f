"""Safe unpacking: real .tar.xz/.tar.gz/.zip files written by the test, good and hostile."""

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from asserts import one_sentence
from synthetic import write_zero_member_tar_xz

from simpsons.archive import UNREAD_LIST, ArchiveError, safe_extract


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:xz") -> Path:
    with tarfile.open(path, mode) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def tar_info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


GOOD = [("dataset/train/bart_simpson/pic_0000.jpg", b"jpeg bytes"), ("dataset/val/gil/pic_0001.jpg", b"more")]


@pytest.mark.parametrize("suffix,mode", [(".tar.xz", "w:xz"), (".tar.gz", "w:gz"), (".tar", "w")])
def test_tar_archives_unpack_their_files(tmp_path, suffix, mode):
    archive = write_tar(tmp_path / f"dataset{suffix}", [tar_info("dataset", tarfile.DIRTYPE), *GOOD], mode)
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "dataset/train/bart_simpson/pic_0000.jpg").read_bytes() == b"jpeg bytes"
    assert (out / "dataset/val/gil/pic_0001.jpg").read_bytes() == b"more"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"dataset{suffix}", "out"]  # no partial folder left


def test_zip_archive_unpacks_its_files(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        for name, data in GOOD:
            zf.writestr(name, data)
    out = safe_extract(tmp_path / "d.zip", tmp_path / "out")
    assert (out / GOOD[0][0]).read_bytes() == GOOD[0][1]


HOSTILE_TARS = {
    "parent": ([*GOOD, ("dataset/../../evil.jpg", b"x")], "contains '..'"),
    "absolute": ([*GOOD, ("/tmp/evil.jpg", b"x")], "absolute path"),
    "symlink": ([*GOOD, tar_info("dataset/link.jpg", tarfile.SYMTYPE, "/etc/passwd")], "is a link"),
    "hardlink": ([*GOOD, tar_info("dataset/hard.jpg", tarfile.LNKTYPE, "dataset/val/gil/pic_0001.jpg")], "is a link"),
    "device": ([*GOOD, tar_info("dataset/null", tarfile.CHRTYPE)], "device or special file"),
    "fifo": ([*GOOD, tar_info("dataset/pipe", tarfile.FIFOTYPE)], "device or special file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TARS))
def test_hostile_tar_is_refused_in_one_sentence_and_nothing_is_extracted(tmp_path, case):
    members, reason = HOSTILE_TARS[case]
    (tmp_path / "src").mkdir()
    archive = write_tar(tmp_path / "src" / "evil.tar.gz", members, "w:gz")
    with pytest.raises(ArchiveError) as err:
        safe_extract(archive, tmp_path / "work" / "out")
    message = str(err.value)
    assert reason in message and "evil.tar.gz" in message and one_sentence(message), message
    # The good members came first and were valid, yet nothing of them is left anywhere.
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()


def test_too_many_members_is_refused(tmp_path):
    archive = write_tar(tmp_path / "many.tar.xz", [(f"d/{i}.jpg", b"x") for i in range(5)])
    with pytest.raises(ArchiveError, match="more than 4 members") as err:
        safe_extract(archive, tmp_path / "out", max_members=4)
    assert one_sentence(str(err.value)) and not (tmp_path / "out").exists()
    safe_extract(archive, tmp_path / "out", max_members=5)  # at the limit is fine


def test_too_many_unpacked_bytes_is_refused(tmp_path):
    archive = write_tar(tmp_path / "bomb.tar.xz", [("d/zeros.bin", bytes(1 << 20))])  # compresses to ~200 bytes
    assert archive.stat().st_size < 10_000
    with pytest.raises(ArchiveError, match="unpacks to more than") as err:
        safe_extract(archive, tmp_path / "out", max_bytes=1 << 19)
    assert one_sentence(str(err.value)) and [p.name for p in tmp_path.iterdir()] == ["bomb.tar.xz"]


def test_hostile_zip_members_are_refused_before_anything_is_written(tmp_path):
    def zip_with(name: str, mode: int | None = None) -> Path:
        path = tmp_path / f"z{len(list(tmp_path.glob('*.zip')))}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(*GOOD[0])
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, "/etc/passwd")
        return path

    cases = [
        (zip_with("../evil.jpg"), "contains '..'"),
        (zip_with("/abs/evil.jpg"), "absolute path"),
        (zip_with("C:/evil.jpg"), "absolute path"),
        (zip_with("a\\..\\..\\evil.jpg"), "contains '..'"),
        (zip_with("link.jpg", stat.S_IFLNK | 0o777), "is a link"),
    ]
    for archive, reason in cases:
        with pytest.raises(ArchiveError, match=reason):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_corrupt_archive_is_one_sentence(tmp_path):
    good = write_tar(tmp_path / "good.tar.xz", GOOD)
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="broken.tar.xz") as err:
        safe_extract(broken, tmp_path / "out")
    assert one_sentence(str(err.value)) and not (tmp_path / "out").exists()


def test_member_over_the_per_image_limit_is_listed_not_unpacked_and_the_rest_is(tmp_path):
    archive = write_zero_member_tar_xz(
        tmp_path / "d.tar.xz", "dataset/train/gil/huge.jpg", 4 << 20, after=GOOD, chunk=1 << 20
    )
    out = safe_extract(archive, tmp_path / "out", max_file_bytes=1 << 20)
    assert (out / GOOD[0][0]).read_bytes() == GOOD[0][1] and (out / GOOD[1][0]).read_bytes() == GOOD[1][1]
    assert not (out / "dataset/train/gil/huge.jpg").exists()
    assert json.loads((out / UNREAD_LIST).read_text()) == [
        {
            "path": "dataset/train/gil/huge.jpg",
            "size": 4 << 20,
            "reason": (
                "4.0 MiB in the archive, over the per-image limit of 1.0 MiB (data.max_image_bytes); not unpacked"
            ),
        }
    ]

    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dataset/train/gil/huge.jpg", bytes(4 << 20))
        zf.writestr(*GOOD[0])
    out = safe_extract(tmp_path / "d.zip", tmp_path / "zip_out", max_file_bytes=1 << 20)
    assert (out / GOOD[0][0]).exists() and not (out / "dataset/train/gil/huge.jpg").exists()
    assert [m["path"] for m in json.loads((out / UNREAD_LIST).read_text())] == ["dataset/train/gil/huge.jpg"]


def test_partial_folder_of_a_killed_unpack_is_removed_by_the_next_one(tmp_path):
    # 512 MiB of zeros to inflate: the unpack is still running when it is killed.
    archive = write_zero_member_tar_xz(tmp_path / "slow.tar.xz", "d/zeros.jpg", 512 << 20, after=GOOD)
    target = tmp_path / "work" / "out"
    code = f"from simpsons.archive import safe_extract; safe_extract({str(archive)!r}, {str(target)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(target.parent.glob(".out.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    left = list(target.parent.glob(".out.partial-*"))
    assert [p.name for p in left] == [f".out.partial-{socket.gethostname()}-{proc.pid}"]  # what a killed run leaves
    live = target.parent / f".out.partial-{socket.gethostname()}-{os.getppid()}"  # a running process's
    live.mkdir()
    out = safe_extract(write_tar(tmp_path / "good.tar.xz", GOOD), target)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out", live.name])
