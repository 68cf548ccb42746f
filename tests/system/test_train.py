"""A real 2-worker Ray Train run on test-written images (`make train`'s config, from a working folder
of its own), its outputs, resume, evaluate and predict."""

import csv
import hashlib
import json
import math

import pytest
import torch
import yaml
from job_scripts import run_job
from ray_head import REPO, TWO_CPU_WORKERS
from synthetic import CLASSES, make_image_tree

from simpsons.config import load_config
from simpsons.report import OUTPUT_FILES


def _cfg(storage, epochs, name="run", *overrides):
    return load_config(
        None,
        [
            f"optim.epochs={epochs}",
            *TWO_CPU_WORKERS,
            "train.histogram_every=1",
            f"run.storage={storage}",
            f"run.name={name}",
            *overrides,
        ],
    )


def _make_train_cfg(epochs, *overrides):
    """`make train`'s config (configs/local.yaml: storage ./runs, name local) at the tests' sizes."""
    return load_config(REPO / "configs" / "local.yaml", [f"optim.epochs={epochs}", *TWO_CPU_WORKERS, *overrides])


@pytest.fixture(scope="module")
def trained_run(ray_cluster, packed_dataset, tmp_path_factory):
    """`make train` as a user types it, from a fresh working folder: its relative ./runs means that
    folder, in the driver and in every Ray worker (which run in folders of their own)."""
    from simpsons.driver import fit

    folder = tmp_path_factory.mktemp("workdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cfg = _make_train_cfg(3, "train.histogram_every=1")
        assert cfg.run.storage == "./runs" and cfg.run.name == "local"
        report = fit(cfg, str(packed_dataset))
    return folder / "runs" / "local", report


def test_two_worker_run_learns_and_writes_every_output(trained_run, packed_dataset):
    run_dir, report = trained_run
    best = run_dir / "best"
    assert sorted(p.name for p in best.iterdir()) == sorted(OUTPUT_FILES)
    metrics = json.loads((best / "metrics.json").read_text())
    # 4 classes: chance is 0.25. The shapes/colours are easy; a broken loop stays near chance.
    assert metrics["accuracy"] >= 0.7, metrics["accuracy"]
    assert metrics["macro_f1"] >= 0.6
    assert metrics["classes_scored"] == 4 and len(metrics["per_class"]) == 42
    assert [h["epoch"] for h in metrics["history"]] == [0, 1, 2]
    rows = list(csv.DictReader((best / "per_class.csv").open()))
    assert {r["class"] for r in rows if r["support"] != "0"} == set(CLASSES)
    assert (best / "confusion.png").stat().st_size > 10_000
    state = torch.load(best / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "scheduler", "epoch", "best_score", "config", "class_names"} <= set(state)
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped
    # Calibration: a temperature fitted on the val split after training, beside accuracy in metrics.json.
    fitted = metrics["calibration"]
    assert fitted["images"] == metrics["images"] == 48
    assert metrics["temperature"] == fitted["temperature"] == state["temperature"] > 0
    assert metrics["ece"] == fitted["ece_after"] and fitted["nll_after"] <= fitted["nll_before"]
    assert state["config"]["train"]["workers"] == 2 and "tune" not in state["config"]  # training sections only
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), sorted(p.name for p in run_dir.rglob("*"))
    assert list(run_dir.glob("checkpoint_*/checkpoint.pt"))
    # Provenance: the result names the dataset, its manifest's checksum and the code that produced it.
    manifest_sha256 = hashlib.sha256((packed_dataset / "manifest.json").read_bytes()).hexdigest()
    for origin in (state["provenance"], metrics["provenance"]):
        assert origin["dataset_uri"] == str(packed_dataset) and origin["manifest_sha256"] == manifest_sha256
        assert origin["code_version"].startswith("0.1.0")
    # The resolved config is written beside the run when it starts, not only into best/.
    for written in (run_dir / "config.yaml", best / "config.yaml"):
        sections = yaml.safe_load(written.read_text())
        assert sections["train"]["workers"] == 2 and "tune" not in sections


def test_rerun_with_the_same_name_resumes_at_the_next_epoch(trained_run, packed_dataset):
    from simpsons.driver import fit

    run_dir, _ = trained_run
    report = fit(_make_train_cfg(4, f"run.storage={run_dir.parent}"), str(packed_dataset))
    history = json.loads((run_dir / "best" / "metrics.json").read_text())["history"]  # the whole run's
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # no epoch run twice
    assert [h["resumed"] for h in history] == [False, False, False, True]
    assert report["accuracy"] >= 0.7


def test_moving_average_and_evaluation_every_second_epoch(ray_cluster, packed_dataset, image_tree, tmp_path):
    """The moving average is scored, served and checkpointed beside the raw weights; with evaluation
    every second epoch, every epoch checkpoints and only evaluated ones rank."""
    from simpsons.driver import fit

    overrides = ("optim.ema_decay=0.8", "model.tta_flip=true", "train.evaluate_every=2", "train.histogram_every=0")
    report = fit(_cfg(tmp_path / "runs", 3, "ema", *overrides), str(packed_dataset))
    best = tmp_path / "runs" / "ema" / "best"

    history = report["history"]
    assert [h["evaluated"] for h in history] == [False, True, True]  # epochs 2 and 3 (the last)
    skipped, *evaluated = history
    assert not any(key.startswith("val_") and key != "val_macro_f1" for key in skipped)
    assert skipped["val_macro_f1"] == skipped["last_val_macro_f1"] == -math.inf  # never the best checkpoint
    assert evaluated[0]["last_val_macro_f1"] == evaluated[0]["val_macro_f1"] >= 0
    assert all({"raw_val_macro_f1", "raw_val_acc", "val_macro_f1"} <= set(h) for h in evaluated)
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["macro_f1"] == pytest.approx(max(h["val_macro_f1"] for h in evaluated))
    assert (best / "curves.png").is_file()  # plots the evaluated epochs only

    state = torch.load(best / "checkpoint.pt", weights_only=True)
    assert state["ema_updates"] > 0
    assert not all(torch.equal(state["served"][k], state["model"][k]) for k in state["model"])
    # evaluate.py serves the averaged weights (with the flip): on the validation images it scores
    # what training reported for the best epoch (bf16 there, fp32 here: one image may differ).
    out = tmp_path / "eval"
    done = run_job("evaluate.py", "--checkpoint", best, "--data", image_tree / "dataset" / "val", "--out", out)
    assert done.returncode == 0, done.stderr
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["images"] == report["images"] == 48
    assert abs(scored["accuracy"] - report["accuracy"]) <= 1 / 48 + 1e-9, (scored["accuracy"], report["accuracy"])


@pytest.mark.timeout(300)  # the bug this pins was a hang: fail in bounded time instead
def test_two_workers_finish_with_a_one_image_validation_split(ray_cluster, tmp_path):
    # Fewer validation images than workers: rank 1 evaluates no batch at all.
    from simpsons.driver import fit
    from simpsons.prepare import pack_tree

    root = make_image_tree(tmp_path / "images", per_split={"train": 8}, size=40)
    make_image_tree(root, classes=CLASSES[:1], per_split={"val": 1}, size=40)
    pack_tree(root, tmp_path / "packed", stored_size=40, workers=1)
    report = fit(_cfg(tmp_path / "runs", 1, "tiny", "train.histogram_every=0"), str(tmp_path / "packed"))
    assert report["images"] == 1 and len(report["history"]) == 1
    assert report["temperature"] == 1.0 and report["calibration"]["images"] == 1  # too few to fit on


def test_evaluate_and_predict_jobs_on_the_checkpoint(trained_run, image_tree, tmp_path):
    run_dir, _ = trained_run
    best = run_dir / "best"
    out = tmp_path / "eval"
    done = run_job("evaluate.py", "--checkpoint", best, "--data", image_tree, "--out", out)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 48 and metrics["accuracy"] >= 0.7
    assert (out / "confusion.png").exists() and (out / "per_class.csv").exists()

    image = next((image_tree / "dataset" / "val" / "lisa_simpson").glob("*.jpg"))
    done = run_job("predict.py", "--checkpoint", best, image, "--json", "--top-k", "2")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["top"]) == 2 and result["top"][0]["prob"] >= result["top"][1]["prob"]
    assert result["top"][0]["label"] == "lisa_simpson"


def test_bad_checkpoint_path_is_one_clear_sentence(tmp_path):
    done = run_job("predict.py", "--checkpoint", tmp_path, "x.jpg")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: No checkpoint at {tmp_path}/checkpoint.pt; pass a run's best/ folder or its checkpoint.pt."
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_clear_sentence(tmp_path):
    done = run_job("predict.py", "--checkpoint", tmp_path, "--device", "cuda", "x.jpg")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: Device cuda asked for, but CUDA is not available on this machine; pass --device cpu."
    ]
