"""Sweep settings: the tune: section's parsing, its bad keys named, one search-space entry set
or removed, the optional Bayesian search, and the ASHA decisions the sweep's trials get."""

from __future__ import annotations

import pytest
import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray_head import REPO

from simpsons.config import Config, ConfigError, OptimConfig, SweepConfig, load_sweep
from simpsons.names import SCORE
from simpsons.tune import EPOCHS, create_searcher, create_trial_scheduler

# ---------------------------------------------------------------------------------------------
# Config (no Ray)


def test_sweep_file_loads_and_bad_keys_name_themselves(tmp_path):
    cfg = load_sweep(REPO / "configs" / "tune.yaml", ["tune.num_samples=3", "optim.lr=0.001"])
    assert cfg.tune.num_samples == 3 and cfg.optim.lr == 0.001 and cfg.optim.epochs == 8
    assert set(cfg.tune.space) >= {"optim.lr", "loss.gamma", "loss.alpha_power"}

    with pytest.raises(ConfigError, match="'tune.num_sample'"):
        load_sweep(None, ["tune.num_sample=3"])
    with pytest.raises(ConfigError, match="tune.space.optim.lrr.*'optim.lrr'"):
        load_sweep(None, ["tune.space.optim.lrr={loguniform: [1.0e-4, 1.0e-2]}"])
    with pytest.raises(ConfigError, match="loguniform needs low < high and low > 0"):
        load_sweep(None, ["tune.space.optim.lr={loguniform: [0, 1.0e-2]}"])
    with pytest.raises(ConfigError, match=r"tune.grace_period \(2\) must not exceed optim.epochs \(1\)"):
        load_sweep(REPO / "configs" / "tune.yaml", ["optim.epochs=1"])
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump({"optim": {"lrr": 0.1}, "tune": {"num_samples": 1}}))
    with pytest.raises(ConfigError, match="'optim.lrr'"):
        load_sweep(bad_file)


def test_one_space_entry_is_set_or_removed_and_the_rest_kept():
    cfg = load_sweep(
        REPO / "configs" / "tune.yaml",
        ["tune.space.optim.weight_decay={loguniform: [1.0e-3, 1.0e-1]}", "tune.space.loss.alpha_power=null"],
    )
    assert cfg.tune.space == {
        "optim.lr": {"loguniform": [3.0e-4, 1.0e-2]},
        "loss.gamma": {"uniform": [0.0, 3.0]},
        "optim.weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
    }
    # A whole space replaces the file's.
    cfg = load_sweep(REPO / "configs" / "tune.yaml", ["tune.space={loss.gamma: {choice: [0, 2]}}"])
    assert cfg.tune.space == {"loss.gamma": {"choice": [0, 2]}}


def test_bayesian_search_is_optional():
    sweep = SweepConfig(search="optuna")
    try:
        import optuna  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install optuna"):
            create_searcher(sweep)
    else:
        assert type(create_searcher(sweep)).__name__ == "OptunaSearch"


def test_asha_stops_trials_behind_at_a_rung_but_never_one_at_its_last_epoch():
    """Tune kills a trial it stops, and with it the Train controller that would have withdrawn its
    request for worker nodes; a trial at its last epoch ends by itself and must be left to."""
    epochs = 6  # grace 2, reduction 3: rungs at epochs 2 and 6, the last one
    scheduler = create_trial_scheduler(
        Config(optim=OptimConfig(epochs=epochs), tune=SweepConfig(grace_period=2, reduction_factor=3))
    )
    scheduler.set_search_properties(metric=SCORE, mode="max")
    trials = [Trial("__fake", trial_id=f"t{i}", stub=True) for i in range(6)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)

    def decide(trial, epoch, score):
        return scheduler.on_trial_result(None, trial, {EPOCHS: epoch, SCORE: score})

    for trial, score in zip(trials[:3], [0.5, 0.6, 0.7]):
        assert decide(trial, 2, score) == TrialScheduler.CONTINUE  # each in the top third of those before it
    assert decide(trials[3], 2, 0.1) == TrialScheduler.STOP  # below the top third at epoch 2
    for trial, score in zip(trials[:2], [0.5, 0.6]):
        assert decide(trial, epochs, score) == TrialScheduler.CONTINUE
    assert decide(trials[2], epochs, 0.1) == TrialScheduler.CONTINUE  # behind, but finished: it ends by itself
