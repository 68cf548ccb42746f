"""Relative paths in a config mean the folder the user ran the job from, in every Ray process.

Ray Train runs each worker, and Tune each trial, in a folder of its own, so `run.storage: ./runs`
(configs/local.yaml, configs/tune.yaml) would send TensorBoard events and every trial's Train run
into Ray's session folder unless the driver resolves it first. Here the README's `make train` config and its smoke sweep run with
their relative `./runs` from a fresh working folder, on the real local Ray cluster, and everything
is found under that folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

from simpsons.config import load_config
from simpsons.report import OUTPUT_FILES

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.stored_size=40",
    "data.train_size=32",
    "optim.batch_size=32",
    "optim.warmup_epochs=0",
    "train.cpus_per_worker=1",
    "train.use_gpu=false",
    "train.histogram_every=1",
]


def test_make_train_config_writes_tensorboard_and_best_under_the_working_folder(
    ray_cluster, packed_dataset, tmp_path, monkeypatch
):
    from simpsons.driver import fit

    monkeypatch.chdir(tmp_path)  # where the user typed `make train`
    cfg = load_config(REPO / "configs" / "local.yaml", [f"data.uri={packed_dataset}", "optim.epochs=1", *SMALL])
    assert cfg.run.storage == "./runs" and cfg.run.name == "local"
    fit(cfg, cfg.data.uri)

    run = tmp_path / "runs" / "local"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events), sorted(p.name for p in run.rglob("*"))
    assert set(OUTPUT_FILES) <= {p.name for p in (run / "best").iterdir()}
    assert list(run.glob("checkpoint_*/checkpoint.pt"))


def test_smoke_sweep_keeps_every_trial_run_under_the_sweep_folder(ray_cluster, packed_dataset, tmp_path, monkeypatch):
    from simpsons.config import load_sweep
    from simpsons.tune import run_sweep

    monkeypatch.chdir(tmp_path)
    # jobs/tune.py --smoke-test on configs/tune.yaml: two one-epoch trials, storage ./runs.
    cfg = load_sweep(
        REPO / "configs" / "tune.yaml",
        [
            "tune.num_samples=2",
            "tune.grace_period=1",
            "tune.max_concurrent_trials=1",
            "train.workers=1",
            f"data.uri={packed_dataset}",
            "optim.epochs=1",
            *SMALL,
        ],
    )
    assert cfg.run.storage == "./runs" and cfg.data.cache_dir == "./cache" and cfg.tune.name == "focal-lr"
    run_sweep(cfg)

    folder = tmp_path / "runs" / "focal-lr"
    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        trial_run = folder / "runs" / f"focal-lr-{row['trial_id']}"
        assert list(trial_run.glob("checkpoint_*/checkpoint.pt")), sorted(p.name for p in folder.rglob("*"))
        assert list((trial_run / "tensorboard").glob("events.out.tfevents.*"))
        assert row["checkpoint"].startswith(str(trial_run)), row["checkpoint"]
    assert set(OUTPUT_FILES) <= {p.name for p in (folder / "best").iterdir()}
