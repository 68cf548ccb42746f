"""Training throughput on the CPU: the original project's pipeline and this project's, side by side.

    python bench/throughput.py                        # real sample, 128 px, batch 64, 2 threads
    python bench/throughput.py --variants all         # also fp32, bf16 without channels_last, compiled
    python bench/throughput.py --images <tree> --quick
    python bench/throughput.py --size 64 --augmentations all   # what each augmentation costs

Pipelines, each timed step by step after warm-up; the timed steps alternate between the
pipelines (one step of each per round, in an order that rotates every round), so load from other
processes on the machine falls on all of them alike:

  baseline     the original project (IlyaKarakulin/Classification-of-the-Simpsons, Model/): a
               Dataset that opens each JPEG with PIL and builds Compose([Resize((S, S)), ToTensor(),
               Normalize]) inside every __getitem__, DataLoader(num_workers=0), the same network in
               fp32 NCHW, its FocalLoss(gamma=1.5) and AdamW
  train        this project's step: packed uint8 images resident in memory (simpsons.data), batched
               augmentation (simpsons.augment.train_transform), simpsons.engine.TrainStep with the
               config's precision and layout (defaults: bf16 autocast, channels_last), cosine schedule
  model_step   the same TrainStep on a ready random input tensor: the cost of the network alone

Figures (stdout, `name value`; img/s = training images per second of the median timed step):
  baseline_img_per_s, train_img_per_s, model_step_img_per_s
  speedup_vs_baseline = train / baseline          (target >= 2.5)
  data_path_fraction  = train / model_step        (target >= 0.9: the data path costs < 10 %)
  baseline_data_img_per_s, data_path_img_per_s    the two data paths alone (no network)
  *_mean, *_best       the same over all timed steps (harmonic mean) and from the fastest step
                       (closest to an idle machine); on a busy machine compare all three
  load_avg_1m_start/_end                           the machine's 1-minute load around the run

With --augmentations, only the data path (TrainPreset and its mix, no network) is timed, once
with every robustness augmentation off and once per named one on (AUGMENTATIONS; `robust` is
configs/robust.yaml's data section), beside the network's step on a ready input:
  data_path_img_per_s, augment_<name>_img_per_s    the preset alone, off and with <name> on
  augment_<name>_step_fraction = (1 / on - 1 / off) / (1 / model_step): the time <name> adds,
                                 as a fraction of the network's step
  *_best                         the same from each pipeline's fastest step
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    ReadyInputs,
    add_common_args,
    add_size_arg,
    emit,
    forever,
    image_tree,
    load_average,
    note,
    packed,
    stored_size_for,
)
from PIL import Image
from torchvision import transforms

from simpsons.augment import MEAN, STD
from simpsons.config import Config, load_config, read_config_file
from simpsons.data import CLASS_NAMES, ResidentSplit, find_layout
from simpsons.dataset import load_packed, read_manifest
from simpsons.engine import train_one_epoch
from simpsons.model import create_model
from simpsons.recipe import build_components, create_scheduler, create_train_preset, create_train_step

# Extra pipelines that show what each choice is worth: name -> config overrides.
VARIANTS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false"],  # the original's arithmetic and layout
    "fp32_cl": ["train.precision=fp32", "train.channels_last=true"],
    "bf16_nchw": ["train.precision=bf16", "train.channels_last=false"],
    "compile": ["train.compile=true"],  # the default step with the network compiled (at the first warm-up step)
}

# The robustness augmentations, each at configs/robust.yaml's strength (or a usual one where that
# leaves it off): name -> config overrides. A probability does not change the cost: every image
# is computed, the chosen ones kept.
AUGMENTATIONS = {
    "colour_jitter": ["data.colour_jitter=[0.3, 0.3, 0.3, 0.05]"],
    "greyscale": ["data.greyscale=0.05"],
    "blur": ["data.blur=0.2"],
    "jpeg": ["data.jpeg=0.25"],
    "erase": ["data.erase=0.25"],
    "mixup": ["data.mixup=0.2"],
    "cutmix": ["data.cutmix=1.0"],
}
ROBUST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "robust.yaml"


def augmentation_overrides(name: str) -> list[str]:
    """The config overrides that turn augmentation `name` on; `robust`: configs/robust.yaml's data section."""
    if name == "robust":
        return [f"data.{key}={json.dumps(value)}" for key, value in read_config_file(ROBUST_CONFIG)["data"].items()]
    return AUGMENTATIONS[name]


# ---------------------------------------------------------------------------------------------
# The original project's pipeline (Model/Dataset.py and Model/Model.py, as published)


class OriginalDataset(torch.utils.data.Dataset):
    """The original SimpsonDataset: one PIL open and a freshly built Compose per item.

    One deviation, in the baseline's favour: labels come from a dict instead of a per-item
    sklearn LabelEncoder.transform call (same indices: sorted class names).
    """

    def __init__(self, split_dir: Path, size: int):
        self.size = size
        self.files = sorted(Path(split_dir).rglob("*.jpg"))
        if not self.files:
            raise SystemExit(f"error: no *.jpg files under {split_dir}; the original pipeline reads JPEGs only.")
        self.labels = [path.parent.name for path in self.files]
        self.index = {name: i for i, name in enumerate(sorted(set(self.labels)))}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = Image.open(self.files[i])
        image.load()
        transform = transforms.Compose(
            [
                transforms.Resize((self.size, self.size)),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )
        return transform(image), self.index[self.labels[i]]


class OriginalFocalLoss(torch.nn.Module):
    """The original FocalLoss: softmax, gather, -log(p + 1e-6), (1 - p)^gamma, mean."""

    def __init__(self, gamma: float = 1.5):
        super().__init__()
        self.gamma = gamma

    def forward(self, inputs, targets):
        probs = F.softmax(inputs, dim=1)
        class_probs = probs.gather(1, targets.view(-1, 1)).squeeze(1)
        return ((1 - class_probs) ** self.gamma * -torch.log(class_probs + 1e-6)).mean()


class OriginalPipeline:
    """The original training step: fp32, NCHW, AdamW(lr 3e-3, wd 0.02), loss.item() every step."""

    def __init__(self, split_dir: Path, size: int, batch: int, data_only: bool = False):
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            OriginalDataset(split_dir, size), batch_size=batch, shuffle=True, num_workers=0
        )
        self.batches = forever(lambda: loader)
        self.data_only = data_only
        if not data_only:
            self.model = create_model(len(CLASS_NAMES), head="original")
            self.loss_fn = OriginalFocalLoss(gamma=1.5)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.02)
        self.summ_loss, self.corrects = 0.0, 0

    def step(self) -> int:
        x, y = next(self.batches)
        if self.data_only:
            return len(y)
        self.optimizer.zero_grad()
        predict = self.model(x)
        loss = self.loss_fn(predict, y)
        loss.backward()
        self.optimizer.step()
        self.summ_loss += loss.item() * x.size(0)
        self.corrects += int(torch.sum(predict.argmax(1) == y))
        return len(y)


# ---------------------------------------------------------------------------------------------
# This project's pipeline


class ProjectPipeline:
    """One training step of the worker's loop at data.train_size (an explicit side, whatever the
    config's progressive resizing): next resident batch -> TrainStep -> running sums."""

    def __init__(
        self, cfg: Config, split: ResidentSplit, class_counts: list[int], bare: bool = False, data_only: bool = False
    ):
        device = torch.device("cpu")
        self.cfg, self.split, self.data_only = cfg, split, data_only
        batch = cfg.optim.batch_size
        model, criterion, optimizer = build_components(cfg, class_counts, device)
        scheduler = create_scheduler(optimizer, cfg, split.steps_per_epoch(batch))
        self.train_step = create_train_step(cfg, model, criterion, optimizer, scheduler)
        size = cfg.data.train_size
        self.preset = ReadyInputs(size) if bare else create_train_preset(cfg, size)
        self.steps = itertools.count()
        if bare:
            # The input the preset would produce: (B, 3, T, T) float32 in the config's layout.
            x = torch.randn(batch, 3, size, size)
            x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
            y = torch.randint(0, len(class_counts), (batch,))
            self.batches = forever(lambda: [(x, y)])
        else:
            counter = iter(range(1 << 30))
            self.batches = forever(lambda: split.train_batches(next(counter), batch, cfg.train.seed))

    def step(self) -> int:
        if self.data_only:
            images, labels = next(self.batches)
            generator = torch.Generator().manual_seed(self.cfg.train.seed)
            self.preset.mix(self.preset(images, generator), generator)
            return len(labels)
        # The training loop's own function, one step at a time: its per-step bookkeeping included.
        trained = train_one_epoch(
            self.train_step, itertools.islice(self.batches, 1), self.preset, self.cfg.train.seed, next(self.steps)
        )
        return trained.images


# ---------------------------------------------------------------------------------------------
# Timing


def measure(pipelines: dict, warmup: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """The img/s of every timed step of each pipeline: `rounds` rounds of `steps` steps each.

    Each round runs every pipeline in turn, starting one further along each time, so the
    pipelines alternate step by step and a burst of load from other processes hits them alike.
    """
    names = list(pipelines)
    for name in names:
        started = time.perf_counter()
        for _ in range(warmup):
            pipelines[name].step()
        note(f"warm-up {name}: {warmup} step(s) in {time.perf_counter() - started:.1f} s")
    rates = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for _ in range(steps):
                started = time.perf_counter()
                images = pipelines[name].step()
                rates[name].append(images / (time.perf_counter() - started))
        note(
            f"round {r + 1}/{rounds} (load {load_average():.2f}): "
            + ", ".join(f"{name} {statistics.median(rates[name][-steps:]):.1f}" for name in names)
            + " img/s"
        )
    return rates


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, "tiny run for tests: 32 px, batch 8, 1 thread, 1 warm-up step, 2 timed steps per pipeline")
    add_size_arg(parser)
    parser.add_argument("--batch", type=int, default=64, help="images per step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per pipeline first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=12, help="timing rounds (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=1, help="timed steps per pipeline per round (default: %(default)s)"
    )
    names = dict(nargs="*", default=[], metavar="NAME")
    variants = ", ".join(VARIANTS)
    parser.add_argument(
        "--variants",
        **names,
        help=f"extra pipelines (train and model step) with other precision/layout: {variants} or all",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the original pipeline (it is the slowest)")
    augmentations = ", ".join(AUGMENTATIONS)
    parser.add_argument(
        "--augmentations",
        **names,
        help=f"time only the data path with each augmentation on: {augmentations}, robust, or all",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    if args.quick:
        # One thread: on a busy machine two threads of tiny ops stall on each other's time slices.
        args.size, args.batch, args.warmup, args.rounds, args.steps, args.threads = 32, 8, 1, 2, 1, 1
    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"error: unknown variant {name!r}; choose from {', '.join(VARIANTS)} or all.")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    tree = image_tree(args.images, cache, args.archive)
    stored = stored_size_for(args.size)
    base = [f"data.train_size={args.size}", f"data.stored_size={stored}", f"optim.batch_size={args.batch}"]
    cfg = load_config(args.config, base + args.set)
    dataset_dir = packed(tree, cache, cfg.data.stored_size)
    images, labels = load_packed(dataset_dir, "train")
    split = ResidentSplit(images, labels)
    counts = read_manifest(dataset_dir)["splits"]["train"]["class_counts"]
    if len(split) < args.batch:
        raise SystemExit(
            f"error: the train split has {len(split)} images, fewer than one batch of {args.batch}; use --batch {len(split)} or more images."
        )
    note(
        f"{len(split)} training images from {tree}; {args.size} px, batch {args.batch}, {args.threads} threads, "
        f"precision {cfg.train.precision}, channels_last {cfg.train.channels_last}"
    )

    if args.augmentations:
        augmentation_costs(args, base, split, counts)
        return
    pipelines = {}
    if not args.no_baseline:
        train_dir = find_layout(tree).train_folder
        pipelines["baseline"] = OriginalPipeline(train_dir, args.size, args.batch)
        pipelines["baseline_data"] = OriginalPipeline(train_dir, args.size, args.batch, data_only=True)
    pipelines["train"] = ProjectPipeline(cfg, split, counts)
    pipelines["model_step"] = ProjectPipeline(cfg, split, counts, bare=True)
    pipelines["data_path"] = ProjectPipeline(cfg, split, counts, data_only=True)
    for name in variants:
        vcfg = load_config(args.config, base + args.set + VARIANTS[name])
        pipelines[f"train_{name}"] = ProjectPipeline(vcfg, split, counts)
        pipelines[f"model_step_{name}"] = ProjectPipeline(vcfg, split, counts, bare=True)

    load_start = load_average()
    step_rates = measure(pipelines, args.warmup, args.rounds, args.steps)
    load_end = load_average()

    # Headline: the median step (robust to bursts of load from other processes); also the mean
    # over all timed steps and the best step (closest to an idle machine).
    summaries = {
        "": {name: statistics.median(r) for name, r in step_rates.items()},
        "_mean": {name: len(r) / sum(1 / x for x in r) for name, r in step_rates.items()},
        "_best": {name: max(r) for name, r in step_rates.items()},
    }
    for suffix, rates in summaries.items():
        for name, rate in rates.items():
            emit(f"{name}_img_per_s{suffix}", rate)
    for suffix, rates in summaries.items():
        if "baseline" in rates:
            emit(f"speedup_vs_baseline{suffix}", rates["train"] / rates["baseline"], 3)
        emit(f"data_path_fraction{suffix}", rates["train"] / rates["model_step"], 3)
        for name in variants:
            emit(f"data_path_fraction_{name}{suffix}", rates[f"train_{name}"] / rates[f"model_step_{name}"], 3)
    emit("load_avg_1m_start", load_start)
    emit("load_avg_1m_end", load_end)
    emit("image_size", args.size, 0)
    emit("batch_size", args.batch, 0)
    emit("threads", args.threads, 0)
    emit("timed_steps_per_pipeline", args.rounds * args.steps, 0)


def augmentation_costs(args: argparse.Namespace, base: list[str], split: ResidentSplit, counts: list[int]) -> None:
    """--augmentations: the data path with each named augmentation on against all off, and the network's step."""
    names = [*AUGMENTATIONS, "robust"] if args.augmentations == ["all"] else args.augmentations
    for name in names:
        if name not in AUGMENTATIONS and name != "robust":
            raise SystemExit(
                f"error: unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}, robust or all."
            )
    cfg = load_config(args.config, base + args.set)
    pipelines = {
        "model_step": ProjectPipeline(cfg, split, counts, bare=True),
        "data_path": ProjectPipeline(cfg, split, counts, data_only=True),
    }
    for name in names:
        on = load_config(args.config, base + args.set + augmentation_overrides(name))
        pipelines[f"augment_{name}"] = ProjectPipeline(on, split, counts, data_only=True)
    step_rates = measure(pipelines, args.warmup, args.rounds, args.steps)
    # The median step, and the fastest (closest to an idle machine: on a busy one compare both).
    for suffix, summary in (("", statistics.median), ("_best", max)):
        rates = {name: summary(r) for name, r in step_rates.items()}
        for name, rate in rates.items():
            emit(f"{name}_img_per_s{suffix}", rate)
        for name in names:
            added = 1 / rates[f"augment_{name}"] - 1 / rates["data_path"]  # s per image
            emit(f"augment_{name}_step_fraction{suffix}", added * rates["model_step"], 3)
    emit("image_size", args.size, 0)
    emit("batch_size", args.batch, 0)
    emit("threads", args.threads, 0)


if __name__ == "__main__":
    import sys

    from simpsons.cli import run_job

    run_job(main, get_args_parser(), log_stream=sys.stderr)  # stdout holds only the figures
