"""The deployable model (best/model.pt2): the checkpoint's outputs on real images, without this code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import trained_checkpoint
from job_scripts import run_job
from synthetic import CLASSES, make_image_tree

from simpsons.checkpoint import load, save_temperature, temperature
from simpsons.config import load_config
from simpsons.data import DataError, load_image
from simpsons.deploy import EXPORT_ATOL, export_model, load_exported
from simpsons.inference import load_checkpoint, predict_logits
from simpsons.metrics import classification_report
from simpsons.prepare import pack_tree
from simpsons.recipe import create_eval_preset
from simpsons.report import write_best

# configs/finetune.yaml: its torchvision architecture is the one a fine-tuned model.pt2 holds.
FINETUNE = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = make_image_tree(tmp_path_factory.mktemp("images"), per_split={"val": 5}, size=56)
    return sorted((root / "dataset" / "val").rglob("pic_*"))


@pytest.mark.parametrize(
    "overrides",
    [(), ("model.tta_flip=true",), (f"model.arch={load_config(FINETUNE).model.arch}",)],
    ids=["original", "original-flip", "finetune-arch"],
)
def test_exported_model_matches_the_checkpoint_on_real_images(tmp_path, images, overrides):
    best = trained_checkpoint(tmp_path / "best", *overrides)
    model, cfg, class_names, _ = load_checkpoint(best, "cpu")
    temperature = 1.7  # a calibrated model: the program divides the logits by it before the softmax
    export_model(model, cfg, class_names, tmp_path / "model.pt2", temperature)
    program, meta = load_exported(tmp_path / "model.pt2")
    assert meta["class_names"] == list(CLASSES) and meta["stored_size"] == 40 and meta["temperature"] == temperature
    decoded = np.stack([load_image(p.read_bytes(), 40) for p in images])  # (20, 40, 40, 3) uint8, JPEG and PNG
    logits = predict_logits(model, decoded, create_eval_preset(cfg), flip=cfg.model.tta_flip)
    expected = (logits / temperature).softmax(dim=1)
    with torch.no_grad():
        served = program(torch.as_tensor(decoded))
        assert program(torch.as_tensor(decoded[:1])).shape == (1, len(CLASSES))  # any batch size
    assert served.shape == expected.shape == (len(images), len(CLASSES))
    assert torch.allclose(served, expected, atol=EXPORT_ATOL, rtol=0), (served - expected).abs().max()


def test_predict_runs_from_the_exported_model_alone(tmp_path, images):
    best = trained_checkpoint(tmp_path / "best")
    model, cfg, class_names, _ = load_checkpoint(best, "cpu")
    save_temperature(best, 1.7)  # both files calibrated, as best/ is: the probabilities below agree
    export_model(model, cfg, class_names, best / "model.pt2", 1.7)
    # Serving needs torch alone: with this project's package made unimportable, the file still runs.
    probe = (
        "import sys, json, torch; sys.modules['simpsons'] = None\n"
        f"extra = {{'simpsons.json': ''}}; program = torch.export.load({str(best / 'model.pt2')!r}, extra_files=extra)\n"
        "probs = program.module()(torch.zeros(3, 40, 40, 3, dtype=torch.uint8))\n"
        "print(json.dumps([list(probs.shape), json.loads(extra['simpsons.json'])['class_names']]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[3, len(CLASSES)], list(CLASSES)]

    tops = {}
    for source in (best, best / "model.pt2"):
        done = run_job("predict.py", "--checkpoint", source, *images[:4], "--json")
        assert done.returncode == 0, done.stderr
        results = [json.loads(line) for line in done.stdout.strip().splitlines()]
        tops[source.name] = [(r["path"], r["top"][0]["label"], round(r["top"][0]["prob"], 4)) for r in results]
    assert tops["best"] == tops["model.pt2"] and len(tops["best"]) == 4


def test_best_folder_is_calibrated_on_the_validation_split_in_every_file(tmp_path):
    """write_best fits the temperature on the val split of the checkpoint's dataset and stores it in
    checkpoint.pt, metrics.json and model.pt2, whose probabilities are softmax(logits / T)."""
    root = make_image_tree(tmp_path / "images", per_split={"train": 2, "val": 5}, size=48)
    pack_tree(root, tmp_path / "packed", stored_size=40, workers=1, class_names=CLASSES)  # the checkpoint's classes
    reported = trained_checkpoint(tmp_path / "reported")
    cm = np.diag([5] * len(CLASSES))
    history = [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "val_macro_f1": 1.0}]
    metrics = {"epoch": 0, "val": classification_report(cm, CLASSES), "confusion": cm.tolist(), "history": history}
    origin = {"dataset_uri": str(tmp_path / "packed"), "manifest_sha256": "", "code_version": "test"}
    (reported / "metrics.json").write_text(json.dumps({**metrics, "provenance": origin}))
    cfg = load_config(None, ["data.stored_size=40", "data.train_size=32", f"data.cache_dir={tmp_path / 'cache'}"])
    report = write_best(reported, str(tmp_path / "best"), cfg)

    best = tmp_path / "best"
    saved = json.loads((best / "metrics.json").read_text())
    fitted = saved["calibration"]
    assert fitted["images"] == 4 * 5 and saved["temperature"] == fitted["temperature"] == report["temperature"]
    assert fitted["temperature"] != 1.0 and fitted["nll_after"] <= fitted["nll_before"]
    assert saved["ece"] == fitted["ece_after"] and saved["nll"] == fitted["nll_after"]
    assert temperature(load(best)) == fitted["temperature"]
    program, meta = load_exported(best / "model.pt2")
    assert meta["temperature"] == fitted["temperature"]
    model, cfg, _, _ = load_checkpoint(best, "cpu")
    decoded = np.stack([load_image(p.read_bytes(), 40) for p in sorted((root / "dataset" / "val").rglob("pic_*"))])
    logits = predict_logits(model, decoded, create_eval_preset(cfg))
    with torch.no_grad():
        served = program(torch.as_tensor(decoded))
    expected = (logits / fitted["temperature"]).softmax(dim=1)
    assert torch.allclose(served, expected, atol=EXPORT_ATOL, rtol=0), (served - expected).abs().max()


def test_a_file_that_is_not_an_exported_model_is_one_sentence(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"not a program")
    with pytest.raises(DataError, match="is not an exported model"):
        load_exported(tmp_path / "model.pt2")
