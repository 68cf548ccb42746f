"""Evaluation reads the trees training reads: one layout detector (data.find_layout) for both.

Real JPEGs in Kaggle's layout, as its download has it:

    simpsons_dataset/simpsons_dataset/<class>/pic_NNNN.jpg             (the training images, twice nested)
    kaggle_simpson_testset/kaggle_simpson_testset/<class>_<n>.jpg      (the flat test set)
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from job_scripts import run_job
from synthetic import draw_example, make_image_tree

from simpsons.checkpoint import FORMAT, save
from simpsons.config import ConfigError, from_dict, load_config, training_dict
from simpsons.data import CLASS_NAMES, DataError
from simpsons.inference import evaluate_folder, predict_files
from simpsons.model import create_model
from simpsons.prepare import scan_tree

TEST_COUNTS = {"abraham_grampa_simpson": 3, "bart_simpson": 2, "lisa_simpson": 1}  # flat test images per class


def write_checkpoint(path: Path, tune: dict | None = None) -> Path:
    """An untrained checkpoint as training saves one: the weights, the resolved config and the class
    list; with `tune`, the config also has that `tune:` section, as checkpoints once did."""
    cfg = load_config(None, ["data.stored_size=40", "data.train_size=32"])
    torch.manual_seed(0)
    model = create_model(len(CLASS_NAMES))
    config = {**training_dict(cfg), **({"tune": tune} if tune is not None else {})}
    state = {"model": model.state_dict(), "config": config, "class_names": list(CLASS_NAMES), "format": FORMAT}
    return save(path, state, metrics={})


def kaggle_tree(root: Path, testset: bool = True) -> Path:
    make_image_tree(root / "simpsons_dataset" / "simpsons_dataset", per_split={"": 4}, size=40, layout="flat")
    if testset:
        folder = root / "kaggle_simpson_testset" / "kaggle_simpson_testset"
        folder.mkdir(parents=True)
        rng = random.Random(0)
        for name, count in TEST_COUNTS.items():
            for n in range(count):  # the real set's numbering: <class>_<n>.jpg, n not from 0
                draw_example(CLASS_NAMES.index(name), 40, rng).save(folder / f"{name}_{n + 10}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run") / "best")


def supports(report: dict) -> dict[str, int]:
    return {row["class"]: row["support"] for row in report["per_class"] if row["support"]}


def test_evaluate_job_scores_the_flat_kaggle_test_set(checkpoint, tmp_path):
    root = kaggle_tree(tmp_path / "kaggle")
    assert set(scan_tree(root).groups) == {"unsplit", "testset"}  # the root training takes
    out = tmp_path / "eval"
    done = run_job(
        "evaluate.py", "--checkpoint", checkpoint, "--data", root, "--out", out, "--device", "cpu", timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert supports(metrics) == TEST_COUNTS and metrics["images"] == 6
    assert metrics["files_left_out"] == []
    # Calibration beside accuracy; a checkpoint written before calibration is served with T = 1.
    assert metrics["temperature"] == 1.0 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("6 images: accuracy ") and f"ECE {metrics['ece']:.4f} at temperature 1.000" in last


def test_a_checkpoint_whose_tune_section_the_sweep_schema_refuses_still_evaluates_and_predicts(tmp_path):
    """Checkpoints once carried the sweep's `tune:` section; reading a model never validates it."""
    old_tune = {"scheduler": "bogus", "retired_key": 1}
    with pytest.raises(ConfigError, match="tune"):  # what today's sweep schema says of it
        from_dict({"tune": old_tune})
    old = write_checkpoint(tmp_path / "old", tune=old_tune)
    root = kaggle_tree(tmp_path / "kaggle")
    assert evaluate_folder(old, root, device="cpu")[0]["images"] == 6
    image = next((root / "kaggle_simpson_testset").rglob("*.jpg"))
    assert len(predict_files(old, [image], top_k=2, device="cpu")[0]["top"]) == 2


def test_evaluate_takes_every_layout_training_takes(checkpoint, tmp_path):
    # Kaggle's layout without a test set: its class folders are scored whole.
    bare = kaggle_tree(tmp_path / "bare", testset=False)
    report, _, _ = evaluate_folder(checkpoint, bare, device="cpu")
    assert supports(report) == {name: 4 for name in ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson")}

    # The original layout: testset when there is one, else val; a split that is not there is named.
    original = make_image_tree(tmp_path / "original", per_split={"train": 2, "val": 3}, size=40)
    assert evaluate_folder(checkpoint, original, device="cpu")[0]["images"] == 4 * 3
    assert evaluate_folder(checkpoint, original, "train", device="cpu")[0]["images"] == 4 * 2
    with pytest.raises(DataError, match=r"has no 'testset' split; it has train, val\.$"):
        evaluate_folder(checkpoint, original, "testset", device="cpu")
    train_only = make_image_tree(tmp_path / "train_only", per_split={"train": 1}, size=40)
    with pytest.raises(DataError, match=r"has no 'val' split; it has train\.$"):
        evaluate_folder(checkpoint, train_only, device="cpu")

    # An archive of a Kaggle root, as train.py --data takes it: unpacked safely into the cache.
    archive = tmp_path / "kaggle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(kaggle_tree(tmp_path / "kaggle"), arcname="kaggle")
    report, _, _ = evaluate_folder(checkpoint, archive, device="cpu", cache_dir=str(tmp_path / "cache"))
    assert supports(report) == TEST_COUNTS
    with pytest.raises(DataError, match=r"has no 'val' split; it has testset\.$"):
        evaluate_folder(checkpoint, tmp_path / "kaggle", "val", device="cpu")


def test_a_misnamed_flat_test_file_is_named(checkpoint, tmp_path):
    root = kaggle_tree(tmp_path / "kaggle")
    folder = root / "kaggle_simpson_testset" / "kaggle_simpson_testset"
    (folder / "bart_simpson_10.jpg").rename(folder / "bartman_7.jpg")
    with pytest.raises(
        DataError,
        match="1 test-set file\\(s\\) not named <class>_<number> with a known class: "
        "kaggle_simpson_testset/kaggle_simpson_testset/bartman_7.jpg;",
    ):
        evaluate_folder(checkpoint, root, device="cpu")
