"""A worker group that never starts (the cluster cannot hold it): Ray Train gives up within
train.capacity_timeout_s and the job ends with one sentence, on a real local Ray cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simpsons.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_ray_train_gives_up_on_a_worker_group_that_never_starts(ray_cluster, packed_dataset, monkeypatch):
    """Past the driver's check (skipped here on purpose), a worker group that cannot start is
    retried simpsons.cluster.CONTROLLER_FAILURE_LIMIT times within train.capacity_timeout_s in all,
    not for ever (Ray's default): without the bound this test would hang until pytest's timeout.
    The failure reaches the user as one sentence about capacity."""
    import ray.train

    from simpsons.cluster import START_TIMEOUT_VARIABLE, CapacityError, capacity_error
    from simpsons.driver import build_trainer

    monkeypatch.delenv(START_TIMEOUT_VARIABLE, raising=False)  # build_trainer sets it: restored after
    cfg = load_config(
        None,
        [
            "train.capacity_timeout_s=8",  # 4 starts of 2 s each
            "train.workers=9",
            "train.cpus_per_worker=1",
            "train.use_gpu=false",
            "data.stored_size=40",
            "data.train_size=32",
            "optim.epochs=1",
            f"run.storage={packed_dataset.parent / 'never-started'}",
        ],
    )
    started = time.monotonic()
    with pytest.raises(ray.train.ControllerError) as err:  # 9 workers x 1 CPU on a 4-CPU cluster
        build_trainer(cfg, str(packed_dataset)).fit()
    assert "worker group startup timed out after 2.0 seconds waiting for 9 workers" in str(err.value), err.value
    assert time.monotonic() - started < 60
    message = str(capacity_error(cfg, err.value))
    assert isinstance(capacity_error(cfg, err.value), CapacityError)
    assert message.startswith("No capacity came for the run: it waited 8 s for 9 Ray Train worker(s) with 1 CPU each")
    assert message.endswith("or raise train.capacity_timeout_s.") and message.count(". ") == 0, message
