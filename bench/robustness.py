"""A checkpoint's macro-F1 on the validation split as it is and under twelve seeded shifts that stand
for the images a deployed classifier meets (simpsons/shifts.py; what each stands for: docs/robustness.md).

The stored validation images (the packed split, at the side the model takes) are shifted and then
given to the model as a deployed one is given images: through its own eval transform (and
test-time flip), from a run's best/ folder, its checkpoint.pt or its exported model.pt2. Prints
one figure a line:

    clean_val_macro_f1                 the split as it is (`val` is the split's name: see --split)
    shift_<name>_val_macro_f1          each shift, in simpsons.shifts.SHIFTS order
    shifted_mean_val_macro_f1          the mean over the shifts
    worst_shift_<name>_val_macro_f1    the lowest shift, named
    shifted_mean_vs_clean              shifted mean / clean

    python bench/robustness.py --checkpoint runs/local/best          # the shared real sample's val split
    python bench/robustness.py --checkpoint runs/local/best/model.pt2 --dataset cache/packed/<key>
    python bench/robustness.py --checkpoint runs/local/best --data ../data/dataset --json out/robust.json

bench/accuracy.py prints the same figures for the best checkpoint of every run it trains.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import REPO, emit, note, skip

from simpsons.cli import run_job
from simpsons.data import DataError
from simpsons.dataset import load_packed, local_dataset_dir, read_manifest
from simpsons.inference import Classifier, open_classifier
from simpsons.prepare import cached_pack
from simpsons.shifts import shifted_scores
from simpsons.sources import fetch_source

SHARED_SAMPLE = REPO.parent / "shared" / "data" / "simpsons_dataset"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's best/ folder, its checkpoint.pt or model.pt2")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--dataset", help="a packed dataset: a folder or an s3:// version (simpsons/dataset.py)")
    data.add_argument(
        "--data",
        default=str(SHARED_SAMPLE),
        help="a raw source as training's data.source takes it, packed once into --cache (default: the shared real sample)",
    )
    parser.add_argument("--split", default="val", help="the split scored (default: %(default)s)")
    parser.add_argument(
        "--cache",
        default=str(REPO / "cache"),
        help="where --data is unpacked and packed, as bench/accuracy.py's runs do (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the shifts' seed (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one)")
    parser.add_argument("--json", type=Path, help="also write the figures and the full scores here")
    parser.add_argument("--quick", action="store_true", help="64 images of the split at most: seconds, for tests")
    return parser


def split_for(dataset_dir: str | Path, split: str, class_names: list[str], stored_size: int):
    """(images (N, S, S, 3) uint8, labels (N,) indexing `class_names`) of a packed dataset's split,
    refused when its images are not at the model's stored side or hold a class the model lacks."""
    manifest = read_manifest(dataset_dir)
    if manifest["stored_size"] != stored_size:
        raise DataError(
            f"{dataset_dir} holds images stored at {manifest['stored_size']} px, but the model takes {stored_size} px; "
            f"pass a dataset packed at data.stored_size={stored_size}, or its source with --data."
        )
    images, labels = load_packed(dataset_dir, split)
    names, index = manifest["class_names"], {name: i for i, name in enumerate(class_names)}
    unknown = [names[i] for i in np.unique(labels) if names[i] not in index]
    if unknown:
        raise DataError(
            f"{dataset_dir} holds images of {len(unknown)} class(es) the model does not know "
            f"({', '.join(unknown[:3])}); score a model trained on its classes."
        )
    return images, np.array([index.get(name, -1) for name in names])[labels]


def score(
    classifier: Classifier, dataset_dir: str | Path, split: str = "val", seed: int = 0, limit: int | None = None
) -> dict:
    """simpsons.shifts.shifted_scores of a loaded model (simpsons.inference.Classifier) on a packed
    dataset's split (at most `limit` images of it, evenly spaced), with what was scored."""
    images, labels = split_for(dataset_dir, split, classifier.class_names, classifier.stored_size)
    if limit is not None and len(labels) > limit:
        keep = np.linspace(0, len(labels) - 1, limit).round().astype(np.int64)  # packed splits are sorted by class
        images, labels = images[keep], labels[keep]
    note(f"scoring {classifier.source} on {len(labels)} images of {dataset_dir} ({split}), clean and shifted")
    scores = shifted_scores(classifier.probabilities, np.array(images), labels, classifier.class_names, seed)
    return {"checkpoint": classifier.source, "sha256": classifier.sha256, "dataset": str(dataset_dir), "split": split,
            **scores}  # fmt: skip


def shift_figures(scores: dict) -> dict[str, float]:
    """The printed figures of score()'s result, by name, in printing order (named after the split)."""
    split = scores["split"]
    figures = {f"clean_{split}_macro_f1": scores["clean"]["macro_f1"]}
    figures |= {f"shift_{name}_{split}_macro_f1": s["macro_f1"] for name, s in scores["shifts"].items()}
    figures[f"shifted_mean_{split}_macro_f1"] = scores["shifted_mean_macro_f1"]
    figures[f"worst_shift_{scores['worst_shift']}_{split}_macro_f1"] = scores["worst_shift_macro_f1"]
    figures["shifted_mean_vs_clean"] = scores["shifted_mean_vs_clean"]
    return figures


def dataset_for(args: argparse.Namespace, stored_size: int) -> str:
    """The packed dataset to score: --dataset, or --data packed into --cache at the model's stored side."""
    if args.dataset:
        return str(local_dataset_dir(args.dataset, args.cache))
    if args.data == str(SHARED_SAMPLE) and not SHARED_SAMPLE.exists():
        skip(f"the shared real sample is not at {SHARED_SAMPLE}; pass --data <source> or --dataset <packed>.")
    return str(cached_pack(fetch_source(args.data, args.cache), args.cache, stored_size))


def main(args: argparse.Namespace) -> None:
    classifier = open_classifier(args.checkpoint, args.device)
    dataset = dataset_for(args, classifier.stored_size)
    scores = score(classifier, dataset, args.split, args.seed, 64 if args.quick else None)
    figures = shift_figures(scores)
    for name, value in figures.items():
        emit(name, value, 4)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"figures": figures, "scores": scores}, indent=1))
        note(f"figures written to {args.json}")


if __name__ == "__main__":
    run_job(main, get_args_parser(), log_stream=sys.stderr)
