"""Batch prediction with Ray Data: label every image under a prefix (S3 or a folder) into Parquet.

    list (driver) -> read + decode + resize (CPU tasks) -> top-k (an actor pool: GPUs, else CPUs) -> Parquet

The driver lists the input once (a path and a size per image: ~150 bytes each) and the paths that
earlier runs already wrote to the output, and hands only the rest to Ray Data. From there the data
streams: Ray Data's executor keeps only a bounded number of blocks in flight (its share of the
object store), so the memory a run needs does not grow with the number of images
(tests/system/test_label.py measures it). Each output file is one block's rows:

    path            the image's URI (s3://bucket/key) or absolute path
    label           the most probable class ("" when the image could not be used)
    labels, probs   the top-k classes and their probabilities, most probable first
    error           "" or why the image was left out (too large, not decodable, not readable)
    model           the checkpoint URI; model_sha256: its file's sha256; code_version: this code's

A rerun on the same output labels only what has no row there yet; an unreadable image gets a row
with its reason (and is not retried: delete its row's file to redo it) and never stops the job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from simpsons import storage
from simpsons.checkpoint import code_version
from simpsons.cluster import absolute_dataset_uri, init_ray
from simpsons.data import IMAGE_SUFFIXES, DataError, decode_image, too_large
from simpsons.inference import open_classifier

_logger = logging.getLogger(__name__)

# Images per model call: a GPU takes many at once (at 144 px stored, 256 images are 16 MB of uint8);
# a CPU gains little past a few dozen and a smaller batch keeps the actors' latency even.
GPU_BATCH = 256
CPU_BATCH = 32
DECODE_BATCH = 64  # images per decode task's batch: each task's output block stays a few MB
# CPUs per decode task. Reading is latency-bound (S3) and decoding is C code, so two share a core;
# and a value unlike the model actors' keeps Ray Data from fusing the decode into those actors
# (operator_fusion.are_remote_args_compatible): decode then runs on every CPU of the cluster.
DECODE_CPUS = 0.5
CPU_ACTORS = 2  # model replicas when the cluster has no GPU (1 CPU each)
OUTPUT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("probs", pa.list_(pa.float32())),
        ("error", pa.string()),
        ("model", pa.string()),
        ("model_sha256", pa.string()),
        ("code_version", pa.string()),
    ]
)


@dataclass
class LabelSummary:
    inputs: int  # image files under the input prefix
    already_done: int  # of them, with a row in the output before this run
    labelled: int  # rows this run wrote
    unreadable: list[dict] = field(default_factory=list)  # [{"path", "error"}] among this run's rows
    not_images: int = 0  # other files under the input prefix (no image suffix), left alone
    seconds: float = 0.0

    def line(self, out: str) -> str:
        rate = f", {self.labelled / self.seconds:.1f} img/s" if self.seconds and self.labelled else ""
        text = (
            f"{self.labelled} images labelled into {out} ({self.already_done} of {self.inputs} already done"
            f"{rate}); {len(self.unreadable)} unreadable, with their reason in the error column"
        )
        if self.unreadable:
            shown = "; ".join(f"{u['path']}: {u['error']}" for u in self.unreadable[:3])
            text += f" ({shown}{'; ...' if len(self.unreadable) > 3 else ''})"
        if self.not_images:
            text += (
                f"; {self.not_images} files without an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))}) left alone"
            )
        return text + "."


# ---------------------------------------------------------------------------------------------
# Driver side: what to label


def _uri(fs: pafs.FileSystem, path: str) -> str:
    """A path inside `fs` as the user writes it: s3://bucket/key, or the local absolute path."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _fs_path(uri: str) -> str:
    """The path inside its pyarrow filesystem of a URI that _uri made."""
    return uri[len("s3://") :] if storage.is_s3(uri) else uri


def list_images(data: str) -> tuple[list[tuple[str, int]], int]:
    """([(URI, size in bytes)] of every image file under `data`, sorted; count of other files)."""
    fs, base = storage.pyarrow_filesystem(data)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise DataError(f"{data} does not exist; pass the folder or s3:// prefix of the images to label.") from None
    except OSError as exc:
        raise storage.StorageError(
            f"Cannot list {data} ({exc}); check the URI, the endpoint and the credentials."
        ) from None
    files = [info for info in infos if info.type == pafs.FileType.File]
    images = sorted((_uri(fs, f.path), f.size) for f in files if PurePosixPath(f.path).suffix.lower() in IMAGE_SUFFIXES)
    return images, len(files) - len(images)


def output_files(out: str) -> list[str]:
    """The Parquet files under the output prefix (paths inside its filesystem)."""
    fs, base = storage.pyarrow_filesystem(out)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(
        i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def read_output(out: str, columns: list[str]) -> pa.Table:
    """`columns` of every row under the output prefix (earlier runs' included). A file that is not
    readable Parquet (a local write cut short) is named in a warning and its rows count as not done."""
    fs, _ = storage.pyarrow_filesystem(out)
    tables = []
    for path in output_files(out):
        try:
            tables.append(pq.read_table(path, columns=columns, filesystem=fs))
        except (OSError, pa.ArrowInvalid) as exc:
            _logger.warning("%s is not readable Parquet (%s); its images are labelled again. Delete it.", path, exc)
    return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table().select(columns)


# ---------------------------------------------------------------------------------------------
# Worker side: decode tasks and model actors


def decode_batch(batch: dict[str, np.ndarray], stored_size: int, max_bytes: int) -> dict[str, np.ndarray]:
    """Read and decode a batch of listed files -> path, image (N, S, S, 3) uint8, error.

    A file that is too large is not read; one that cannot be read or decoded keeps a zero image
    and its reason, so that it gets a row and the job goes on."""
    paths, sizes = batch["path"], batch["size"]
    fs, _ = storage.pyarrow_filesystem(str(paths[0])) if len(paths) else (None, "")
    images = np.zeros((len(paths), stored_size, stored_size, 3), dtype=np.uint8)
    errors = []
    for i, (path, size) in enumerate(zip(paths, sizes)):
        if size > max_bytes:
            errors.append(too_large(int(size), max_bytes))
            continue
        try:
            with fs.open_input_stream(_fs_path(str(path))) as f:
                data = f.read()
        except OSError as exc:  # gone since the listing, no permission, a store that keeps failing
            errors.append(f"cannot read: {exc}")
            continue
        image, reason = decode_image(data, stored_size)
        if image is not None:
            images[i] = image
        errors.append(reason)
    return {"path": paths, "image": images, "error": np.array(errors, dtype=object)}


class Labeller:
    """One model replica of the actor pool (a GPU when it was given one): top-k for decoded batches."""

    def __init__(self, checkpoint: str, top_k: int, code: str):
        self.classifier = open_classifier(checkpoint)
        self.top_k, self.code = top_k, code

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [str(e) for e in batch["error"]]
        usable = np.array([not e for e in errors], dtype=bool)
        tops = iter(self.classifier.top_k(batch["image"][usable], self.top_k))
        labels, probs = [], []
        for ok in usable:
            top = next(tops) if ok else []
            labels.append([t["label"] for t in top])
            probs.append([t["prob"] for t in top])
        n = len(errors)
        return pa.table(
            {
                "path": [str(p) for p in batch["path"]],
                "label": [names[0] if names else "" for names in labels],
                "labels": labels,
                "probs": probs,
                "error": errors,
                "model": [self.classifier.source] * n,
                "model_sha256": [self.classifier.sha256] * n,
                "code_version": [self.code] * n,
            },
            schema=OUTPUT_SCHEMA,
        )


# ---------------------------------------------------------------------------------------------
# The job


def model_resources(gpus: int | None, cpu_actors: int) -> tuple[int, dict, int]:
    """(actors, Ray resources per actor, batch size): one actor per GPU when there are GPUs (`gpus`,
    default: those the cluster has now), else `cpu_actors` actors of 1 CPU, fewer when the cluster's
    CPUs would leave none for the decode tasks (the actors would hold every CPU and nothing decode)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if gpus is None else gpus
    if gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}, GPU_BATCH
    return max(1, min(cpu_actors, int(resources.get("CPU", 0) - DECODE_CPUS))), {"num_cpus": 1}, CPU_BATCH


def label(
    checkpoint: str,
    data: str,
    out: str,
    top_k: int = 3,
    gpus: int | None = None,
    cpu_actors: int = CPU_ACTORS,
    batch_size: int | None = None,
) -> LabelSummary:
    """Label every image under `data` that `out` has no row for yet (see the module's docstring).

    Joins the Ray cluster (RAY_ADDRESS) or starts a local one. `checkpoint` is a run's best/
    folder, checkpoint.pt or model.pt2, local or s3://; local paths must be on every node.
    """
    start = time.perf_counter()
    # Resolved here: the workers neither share this process's working directory nor parse `~`.
    checkpoint, data, out = (absolute_dataset_uri(uri.rstrip("/")) for uri in (checkpoint, data, out))
    probe = open_classifier(checkpoint, device="cpu")  # the driver loads it once: fail here, not in an actor
    images, not_images = list_images(data)
    if not images:
        raise DataError(
            f"No image files under {data} ({not_images} other files); pass the folder or s3:// prefix of the images."
        )
    storage.check_writable(out)  # a missing bucket or a read-only folder in one sentence, before any work
    done = set(read_output(out, ["path"]).column("path").to_pylist())
    todo = [(path, size) for path, size in images if path not in done]
    summary = LabelSummary(len(images), len(images) - len(todo), 0, not_images=not_images)
    if not todo:
        summary.seconds = time.perf_counter() - start
        return summary
    if not storage.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)

    init_ray()
    actors, resources, device_batch = model_resources(gpus, cpu_actors)
    fs, out_path = storage.pyarrow_filesystem(out)
    listing = ray.data.from_items(
        [{"path": path, "size": size} for path, size in todo],
        override_num_blocks=max(1, min(len(todo) // DECODE_BATCH, 10_000)),
    )
    decoded = listing.map_batches(
        decode_batch,
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={"stored_size": probe.stored_size, "max_bytes": probe.max_bytes},
        num_cpus=DECODE_CPUS,
    )
    labelled = decoded.map_batches(
        Labeller,
        batch_size=batch_size or device_batch,
        batch_format="numpy",
        fn_constructor_kwargs={"checkpoint": checkpoint, "top_k": top_k, "code": code_version()},
        compute=ray.data.ActorPoolStrategy(size=actors),
        **resources,
    )
    before = set(output_files(out))
    labelled.write_parquet(out_path, filesystem=fs)
    written = [p for p in output_files(out) if p not in before]
    rows = pa.concat_tables([pq.read_table(p, columns=["path", "error"], filesystem=fs) for p in written])
    summary.labelled = rows.num_rows
    summary.unreadable = [r for r in rows.to_pylist() if r["error"]]
    summary.seconds = time.perf_counter() - start
    return summary
