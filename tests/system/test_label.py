"""Batch prediction with Ray Data (simpsons/label.py, jobs/label.py) on the loopback S3 server and a real
local Ray cluster: one row per image, predict.py's labels, reruns that skip what is done, bad files
listed, and memory that does not grow with the number of images."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import boto3
import pytest
from checkpoints import trained_checkpoint
from job_scripts import run_job
from memory_watch import MemoryWatch
from ray_head import RayHead, job_submit
from synthetic import make_image_tree

from simpsons.label import label, read_output
from simpsons.storage import upload_dir

# 100 MB (Ray's smallest is 75 MB): the 10x run's decoded images (2,000 x 144 x 144 x 3 bytes = 124 MB)
# do not fit in it, so a job that held them all would spill to disk or fail; a streaming one does neither.
RAY_OBJECT_STORE_BYTES = 100 * 10**6
STORED = 144  # the checkpoint's data.stored_size: 62 KB per decoded image
MAX_IMAGE_BYTES = 100_000  # the checkpoint's data.max_image_bytes: the test's "too large" file is over it
# The bound on the 10x run's peak. Object store: Ray Data's streaming executor keeps its blocks in
# flight within half the store (resource_manager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION), 50 MB
# here whatever the number of images (measured: 4-18 MiB for 200-300 images, 12-32 MiB for
# 2,000-3,000). Processes: no one process (the driver, a decode task's or a model actor's worker)
# peaks more than 150 MiB above its 1x peak. The sum over all processes is printed, not bounded: it
# moves by GBs with the number of idle workers Ray keeps (4.6 to 6.0 GB between two runs of this
# test), not with the images.
STORE_BOUND = RAY_OBJECT_STORE_BYTES // 2
PROCESS_GROWTH_BOUND = 150 * 2**20


@pytest.fixture(scope="module")
def best(tmp_path_factory) -> Path:
    return trained_checkpoint(
        tmp_path_factory.mktemp("run") / "best",
        f"data.stored_size={STORED}",
        f"data.max_image_bytes={MAX_IMAGE_BYTES}",
    )


def image_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Written JPEG/PNG images of the 4 test classes (4 x per_class files), plus three bad files."""
    make_image_tree(root, per_split={"frames": per_class}, size=56, seed=seed)
    frames = root / "dataset" / "frames"
    (frames / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (frames / "empty.png").write_bytes(b"")
    (frames / "huge.jpg").write_bytes(os.urandom(MAX_IMAGE_BYTES + 1))
    (frames / "notes.txt").write_text("not an image: left alone")
    return frames


def s3_uri(bucket: str, local: Path, prefix: str) -> str:
    upload_dir(local, f"s3://{bucket}/{prefix}")
    return f"s3://{bucket}/{prefix}"


def predictions(out: str) -> dict[str, tuple]:
    rows = read_output(out, ["path", "label", "labels", "probs", "error"]).to_pylist()
    counts = Counter(row["path"] for row in rows)
    assert max(counts.values()) == 1, [path for path, n in counts.items() if n > 1][:5]
    return {row["path"]: (row["labels"], row["probs"], row["error"]) for row in rows}


def test_every_image_in_a_bucket_gets_one_row_with_predict_pys_labels(ray_cluster, s3_server, bucket, best, tmp_path):
    frames = image_folder(tmp_path / "images", per_class=75)  # 300 images + 3 bad files
    data = s3_uri(bucket, frames, "frames")
    checkpoint = s3_uri(bucket, best, "runs/best")
    out = f"s3://{bucket}/labels"

    summary = label(checkpoint, data, out, top_k=3, cpu_actors=2)
    rows = predictions(out)
    names = sorted(p.relative_to(frames).as_posix() for p in frames.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert sorted(path.removeprefix(f"{data}/") for path in rows) == names and len(names) == 303
    assert (summary.inputs, summary.already_done, summary.labelled, summary.not_images) == (303, 0, 303, 1)
    reasons = {Path(u["path"]).name: u["error"] for u in summary.unreadable}
    assert set(reasons) == {"corrupt.jpg", "empty.png", "huge.jpg"}
    assert reasons["empty.png"] == "empty file (0 bytes)" and "over the per-image limit" in reasons["huge.jpg"]
    assert reasons["corrupt.jpg"].startswith("cannot decode")

    # predict.py on the same files, read from the local copies that were uploaded
    done = run_job("predict.py", "--checkpoint", best, frames, "--json", "--top-k", "3")
    assert done.returncode == 0, done.stderr
    expected = {}
    for line in done.stdout.strip().splitlines():
        result = json.loads(line)
        expected[Path(result["path"]).relative_to(frames).as_posix()] = result
    assert len(expected) == 303  # predict.py expands the folder to its image files: all but notes.txt
    for path, (labels, probs, error) in rows.items():
        result = expected[path.removeprefix(f"{data}/")]
        if "error" in result:
            assert (labels, error) == ([], result["error"]), path
        else:
            assert labels == [t["label"] for t in result["top"]], path
            assert probs == pytest.approx([t["prob"] for t in result["top"]], abs=1e-5), path
    table = read_output(out, ["model", "model_sha256", "code_version"]).to_pylist()
    assert {row["model"] for row in table} == {f"{checkpoint}/checkpoint.pt"}
    assert all(len(row["model_sha256"]) == 64 and row["code_version"] for row in table)

    # A rerun on the same output labels nothing again; new images alone get rows.
    again = label(checkpoint, data, out, cpu_actors=2)
    assert (again.already_done, again.labelled) == (303, 0)
    new = image_folder(tmp_path / "more", per_class=2, seed=7)
    client = boto3.client("s3")
    for i, path in enumerate(sorted(new.glob("*/*.jpg"))[:5]):
        client.put_object(Bucket=bucket, Key=f"frames/new/{i}.jpg", Body=path.read_bytes())
    third = label(checkpoint, data, out, cpu_actors=2)
    assert (third.inputs, third.already_done, third.labelled, third.unreadable) == (308, 303, 5, [])
    assert len(predictions(out)) == 308


def test_the_job_runs_as_a_submitted_ray_job(s3_server, bucket, best, tmp_path):
    # `ray job submit -- python jobs/label.py ...` against a real `ray start --head` with token auth,
    # everything in the loopback S3 server: the cluster-job form of the command above.
    frames = image_folder(tmp_path / "images", per_class=5)  # 20 images + 3 bad files
    data, checkpoint = s3_uri(bucket, frames, "frames"), s3_uri(bucket, best, "runs/best")
    out = f"s3://{bucket}/labels"
    with RayHead(num_cpus=4) as head:
        command = ["jobs/label.py", "--checkpoint", checkpoint, "--data", data, "--out", out]
        done = head.run(job_submit("simpsons-label-test", *command), env=head.job_client_env(), timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Job 'simpsons-label-test' succeeded" in output, output[-6000:]
    assert f"23 images labelled into {out} (0 of 23 already done" in output, output[-6000:]
    assert "3 unreadable" in output and len(predictions(out)) == 23


def test_memory_does_not_grow_with_ten_times_the_images(ray_cluster, s3_server, bucket, best, tmp_path):
    peaks = {}
    for per_class in (50, 500):  # 200 images, then 2,000
        frames = image_folder(tmp_path / f"images-{per_class}", per_class=per_class)
        data = s3_uri(bucket, frames, f"frames-{per_class}")
        with MemoryWatch() as watch:
            summary = label(str(best), data, str(tmp_path / f"labels-{per_class}"), cpu_actors=2)
        assert summary.labelled == 4 * per_class + 3
        peaks[per_class] = watch
        print(
            f"{4 * per_class} images: peak object store {watch.peak_store / 2**20:.1f} MiB, "
            f"largest process {watch.peak_process_rss / 2**20:.0f} MiB, all processes {watch.peak_rss / 2**20:.0f} MiB, "
            f"spilled {watch.spilled / 2**20:.1f} MiB"
        )
        assert watch.spilled == 0
    small, large = peaks[50], peaks[500]
    decoded = 2000 * STORED * STORED * 3
    assert decoded > RAY_OBJECT_STORE_BYTES
    assert large.peak_store < STORE_BOUND, large.peak_store
    assert large.peak_process_rss < small.peak_process_rss + PROCESS_GROWTH_BOUND, (
        small.peak_process_rss,
        large.peak_process_rss,
    )


@pytest.mark.parametrize(
    "what, sentence",
    [
        ("checkpoint", "No checkpoint at"),
        ("data", "does not exist; pass the folder or s3:// prefix"),
        ("no-images", "No image files under"),
        ("bucket", "Bucket 'no-such-bucket' does not exist"),
    ],
)
def test_the_job_refuses_a_bad_checkpoint_input_or_output_in_one_sentence(best, tmp_path, request, what, sentence):
    # Refused before Ray starts: the model is loaded, the input listed and the output checked first.
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("no images here")
    make_image_tree(tmp_path / "images", per_split={"frames": 1}, size=32)
    checkpoint, data, out = best, tmp_path / "images", str(tmp_path / "out")
    if what == "checkpoint":
        checkpoint = tmp_path / "nothing"
    elif what == "data":
        data = tmp_path / "no-frames"
    elif what == "no-images":
        data = tmp_path / "frames"
    else:
        request.getfixturevalue("s3_server")  # the loopback S3 server, in the job's environment
        out = "s3://no-such-bucket/labels"
    done = run_job("label.py", "--checkpoint", checkpoint, "--data", data, "--out", out)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and sentence in lines[0], lines
    assert not (tmp_path / "out").exists()
