"""Relative paths in a config mean the folder the user ran the job from, in every Ray process.

Ray Train runs each worker, and Tune each trial, in a folder of its own, so `run.storage: ./runs`
(configs/local.yaml, configs/tune.yaml) would send TensorBoard events and every trial's Train run
into Ray's session folder unless the driver resolves it first. Here the smoke sweep runs with its
relative `./runs` from a fresh working folder, on the real local Ray cluster, and everything is
found under that folder (`make train`'s config is tests/system/test_train.py's run).
"""

from __future__ import annotations

import csv
from pathlib import Path

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
