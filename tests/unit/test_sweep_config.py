"""Sweep settings: the tune: section's parsing, its bad keys named, one search-space entry set
or removed, and the optional Bayesian search."""

from __future__ import annotations

import pytest
import yaml
from ray_head import REPO

from simpsons.config import ConfigError, SweepConfig, load_sweep
from simpsons.tune import create_searcher

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
