"""The deployable model in best/: `model.pt2`, a torch.export program that needs none of this code.

It takes what a service has after decoding: uint8 images (B, S, S, 3) at the dataset's stored
size S, any batch size, and returns calibrated class probabilities (B, C) in fp32. The evaluation
preprocessing (resize to data.train_size, normalisation) and the calibration temperature are
inside the program, and the class names, sizes and temperature travel in the file
(`simpsons.json`), so serving it takes torch alone:

    program = torch.export.load("best/model.pt2", extra_files={"simpsons.json": ""})
    probs = program.module()(images)   # images: torch.uint8 (B, S, S, 3)

Its outputs match the checkpoint's (`inference.predict_proba`) within EXPORT_ATOL (tests/integration/test_deploy.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from simpsons.augment import EvalPreset
from simpsons.calibration import probabilities
from simpsons.config import Config
from simpsons.data import DataError
from simpsons.model import classify
from simpsons.recipe import create_eval_preset

MODEL_FILE = "model.pt2"
METADATA = "simpsons.json"
# Largest difference of any probability from the checkpoint's, fp32 on the CPU.
EXPORT_ATOL = 1e-5


class _Served(nn.Module):
    """uint8 (B, S, S, 3) -> probabilities (B, C): the evaluation preset, the network (with the
    test-time flip when the run used it), softmax of the logits / temperature; what
    inference.predict_proba computes."""

    def __init__(self, model: nn.Module, preset: EvalPreset, flip: bool, temperature: float):
        super().__init__()
        self.model, self.preset, self.flip, self.temperature = model, preset, flip, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return probabilities(classify(self.model, self.preset(images), self.flip), self.temperature)


def export_model(
    model: nn.Module, cfg: Config, class_names: list[str], path: str | Path, temperature: float = 1.0
) -> Path:
    """Write `model` (moved to the CPU in fp32, eval mode) with the run's evaluation preprocessing
    and calibration `temperature` as a torch.export program at `path`."""
    model = model.float().cpu().eval()
    stored = cfg.data.stored_size
    example = torch.zeros(2, stored, stored, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    served = _Served(model, create_eval_preset(cfg), cfg.model.tta_flip, float(temperature))
    with torch.no_grad():
        program = torch.export.export(served, (example,), dynamic_shapes=({0: batch},))
    metadata = {
        "class_names": list(class_names),
        "stored_size": stored,
        "train_size": cfg.data.train_size,
        "tta_flip": cfg.model.tta_flip,
        "temperature": float(temperature),
    }
    torch.export.save(program, str(path), extra_files={METADATA: json.dumps(metadata)})
    return Path(path)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(callable module on `device`: uint8 (B, S, S, 3) there -> probabilities (B, C) there, metadata)
    of a model.pt2."""
    extra = {METADATA: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception:  # not a zip, not an exported program, written by an incompatible torch
        raise DataError(f"{path} is not an exported model this torch can load; pass a run's best/model.pt2.") from None
    if not extra[METADATA]:
        raise DataError(f"{path} is an exported program but not a model of this project (it has no {METADATA}).")
    device = torch.device(device)
    if device.type != "cpu":
        # The graph was traced on the CPU and fixes that device: its weights, its constants (the
        # normalisation's mean and std) and the device of every tensor it makes. The pass re-places
        # all of them; without it the program would refuse (or, moved by hand, partly run on) another device.
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:
            raise DataError(
                f"This torch ({torch.__version__}) cannot move an exported program to {device}; "
                "pass --device cpu, or the run's best/checkpoint.pt to run on the GPU."
            ) from None
        program = move_to_device_pass(program, device)
    return program.module(), json.loads(extra[METADATA])


def is_exported(path: str | Path) -> bool:
    return Path(path).suffix == Path(MODEL_FILE).suffix
