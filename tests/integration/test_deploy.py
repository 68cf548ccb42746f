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

from simpsons.config import load_config
from simpsons.data import DataError, load_image
from simpsons.deploy import EXPORT_ATOL, export_model, load_exported
from simpsons.inference import load_checkpoint, predict_proba
from simpsons.recipe import create_eval_preset

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
    export_model(model, cfg, class_names, tmp_path / "model.pt2")
    program, meta = load_exported(tmp_path / "model.pt2")
    assert meta["class_names"] == list(CLASSES) and meta["stored_size"] == 40
    decoded = np.stack([load_image(p.read_bytes(), 40) for p in images])  # (20, 40, 40, 3) uint8, JPEG and PNG
    expected = predict_proba(model, decoded, create_eval_preset(cfg), flip=cfg.model.tta_flip)
    with torch.no_grad():
        served = program(torch.as_tensor(decoded))
        assert program(torch.as_tensor(decoded[:1])).shape == (1, len(CLASSES))  # any batch size
    assert served.shape == expected.shape == (len(images), len(CLASSES))
    assert torch.allclose(served, expected, atol=EXPORT_ATOL, rtol=0), (served - expected).abs().max()


def test_predict_runs_from_the_exported_model_alone(tmp_path, images):
    best = trained_checkpoint(tmp_path / "best")
    model, cfg, class_names, _ = load_checkpoint(best, "cpu")
    export_model(model, cfg, class_names, best / "model.pt2")
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


def test_a_file_that_is_not_an_exported_model_is_one_sentence(tmp_path):
    (tmp_path / "model.pt2").write_bytes(b"not a program")
    with pytest.raises(DataError, match="is not an exported model"):
        load_exported(tmp_path / "model.pt2")
