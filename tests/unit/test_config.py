import pytest
import torch
import yaml

from simpsons.config import (
    ConfigError,
    from_dict,
    load_config,
    save_config,
    to_dict,
    training_config,
    training_dict,
)
from simpsons.recipe import create_eval_preset, create_train_preset


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  epochs: 7\nloss:\n  alpha: 0.25\n")
    cfg = load_config(path, ["optim.lr=0.002", "train.workers=2", "data.crop_scale=[0.5, 1.0]"])
    assert cfg.optim.lr == 0.002 and cfg.optim.epochs == 7
    assert cfg.loss.alpha == 0.25 and cfg.train.workers == 2
    assert cfg.data.crop_scale == [0.5, 1.0]
    assert cfg.optim.batch_size == 64  # untouched default


def test_int_and_exponent_strings_are_accepted_for_a_float_field():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001  # YAML reads 1e-3 as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=0.1", "Unknown config key 'optim.learning_rate'"),
        ("optimizer.lr=0.1", "Unknown config key 'optimizer.lr'"),
        ("optim.epochs=ten", "'optim.epochs' must be of type int"),
        ("train.use_gpu=maybe", "train.use_gpu must be true, false or 'auto'"),
        ("optim.schedule=linear", "optim.schedule must be one of cosine, plateau"),
        ("optim", "must look like section.key=value"),
        ("data.train_size=200", "must not exceed data.stored_size"),
        ("data.resize_from=0", "data.resize_from"),
        ("data.resize_ramp=[0.9, 0.5]", "data.resize_ramp must be two fractions of the run"),
        ("data.crop_ratio=[2, 1]", r"data.crop_ratio must be two aspect ratios 0 < low <= high"),
        ("data.colour_jitter=[0.4, 0.4, 0.4]", r"data.colour_jitter must be four strengths"),
        ("data.colour_jitter=[0, 0, 0, 0.6]", r"data.colour_jitter must .* hue at most 0.5"),
        ("data.greyscale=1.5", r"data.greyscale must be from 0 to 1, not 1.5; set it with --set data.greyscale="),
        ("data.blur=-0.1", "data.blur must be from 0 to 1"),
        ("data.blur_sigma=[2, 3]", "data.blur_sigma must be two sigmas as fractions of the image side"),
        ("data.jpeg=2", "data.jpeg must be from 0 to 1"),
        ("data.jpeg_quality=[0, 50]", r"data.jpeg_quality must be two JPEG qualities 1 <= low <= high <= 100"),
        ("data.erase=1.1", "data.erase must be from 0 to 1"),
        ("data.mixup=-1", "data.mixup must be at least 0"),
        ("data.cutmix=-1", "data.cutmix must be at least 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# Out-of-bounds values, each refused with the whole sentence a job prints after "error: " (the
# job's exit 2 and nothing written is proven once per kind in integration/test_bad_input.py).
@pytest.mark.parametrize(
    "override, sentence",
    [
        ("optim.epochs=-1", "optim.epochs must be at least 1, not -1; set it with --set optim.epochs=<value>."),
        ("optim.lr=0", "optim.lr must be more than 0, not 0.0; set it with --set optim.lr=<value>."),
        ("model.dropout=1.5", "model.dropout must be from 0 to 1, not 1.5; set it with --set model.dropout=<value>."),
        (
            "train.max_failures=-1",
            "train.max_failures must be at least 0, not -1; set it with --set train.max_failures=<value>.",
        ),
        (
            "data.max_image_bytes=0",
            "data.max_image_bytes must be at least 1, not 0; set it with --set data.max_image_bytes=<value>.",
        ),
        (
            "train.resources_per_worker=[1]",
            "train.resources_per_worker must map custom Ray resource names to positive amounts, e.g. {A10G: 1} (CPU and GPU have their own keys), not [1].",
        ),
        (
            "data.classes=[bart_simpson]",
            "data.classes must be 'auto' or a list of at least 2 class names, not ['bart_simpson'].",
        ),
        ("data.crop_scale=[0.5]", "data.crop_scale must be two numbers 0 < low <= high <= 1, not [0.5]."),
        ("loss.alpha=[1, -1]", "loss.alpha weights must be numbers of 0 or more, not [1, -1]."),
    ],
)
def test_out_of_bounds_values_are_one_sentence_naming_the_key_and_the_fix(override, sentence):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [override])
    assert str(refused.value) == sentence


def test_unknown_key_in_a_yaml_file_names_the_full_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sorce: x\n")
    with pytest.raises(ConfigError, match="Unknown config key 'data.sorce'"):
        load_config(path)


def test_missing_file_is_one_clear_sentence(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["loss.alpha=[1.0, 2.0]", "run.name=x"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


def test_run_folders_and_checkpoints_keep_the_training_sections_only(tmp_path):
    cfg = load_config(None, ["tune.num_samples=3", "optim.lr=0.01"])
    save_config(cfg, tmp_path / "c.yaml")
    assert "tune" not in training_dict(cfg) and "tune" not in yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(load_config(None, ["optim.lr=0.01"]))
    # An old checkpoint's `tune:` section, whatever it holds, is not read.
    assert to_dict(training_config({**training_dict(cfg), "tune": {"retired_key": 1}})) == to_dict(
        load_config(tmp_path / "c.yaml")
    )


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        load_config(path)  # sweep files too: their tune: section is one more section of the tree


def test_a_dotted_key_below_a_mapping_sets_one_entry_and_copies_leave_the_original():
    from simpsons.config import set_key, with_overrides

    cfg = load_config(None, ["train.resources_per_worker.A10G=1"])
    assert cfg.train.resources_per_worker == {"A10G": 1}
    set_key(cfg, "train.resources_per_worker.A10G", None)  # null removes the entry
    assert cfg.train.resources_per_worker == {}
    changed = with_overrides(cfg, {"optim.lr": 0.5, "tune.num_samples": 2})
    assert (changed.optim.lr, changed.tune.num_samples) == (0.5, 2)
    assert (cfg.optim.lr, cfg.tune.num_samples) == (3e-3, 8)
    with pytest.raises(ConfigError, match="Unknown config key 'loss.alpha.x': 'alpha' is a value, not a section"):
        load_config(None, ["loss.alpha.x=1"])


def test_the_original_recipe_pins_every_value_the_defaults_changed():
    # configs/original.yaml is bench/accuracy.py's baseline: a default changed later must not leak into it.
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "original.yaml")
    assert (cfg.data.augment, cfg.data.resize_from, cfg.model.dropout, cfg.model.head) == (False, 1, 0.5, "original")
    assert (cfg.loss.alpha, cfg.loss.label_smoothing, cfg.optim.schedule, cfg.optim.ema_decay) == (
        None,
        0,
        "plateau",
        0,
    )
    assert (cfg.model.arch, cfg.model.weights, cfg.model.tta_flip) == ("original", "none", False)
    # No augmentation at all, whatever the defaults of the robustness keys become: each is pinned off.
    d = cfg.data
    assert d.colour_jitter == [0, 0, 0, 0] and (d.greyscale, d.blur, d.jpeg, d.erase, d.mixup, d.cutmix) == (0,) * 6
    preset = create_train_preset(cfg)
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8)
    assert not preset.mixes and torch.equal(preset(images, torch.Generator()), create_eval_preset(cfg)(images))


def test_the_librarys_defaults_are_the_configs():
    # A library function called without an argument behaves as the default config does; where the
    # library has no sensible default it takes none (FocalLoss, TrainPreset, train_transform).
    import inspect

    from simpsons import augment, dataset, inference, loss, model, prepare, sources

    cfg = load_config(None)

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    pairs = {
        "model.create_model head": (default(model.create_model, "head"), cfg.model.head),
        "model.create_model dropout": (default(model.create_model, "dropout"), cfg.model.dropout),
        "model.create_model arch": (default(model.create_model, "arch"), cfg.model.arch),
        "loss.resolve_alpha power": (default(loss.resolve_alpha, "power"), cfg.loss.alpha_power),
        "loss.balance_alpha power": (default(loss.balance_alpha, "power"), cfg.loss.alpha_power),
        "augment.eval_transform channels_last": (
            default(augment.eval_transform, "channels_last"),
            cfg.train.channels_last,
        ),
        "augment.train_transform channels_last": (
            default(augment.train_transform, "channels_last"),
            cfg.train.channels_last,
        ),
        "augment.train_transform ratio": (default(augment.train_transform, "ratio"), tuple(cfg.data.crop_ratio)),
        "augment.random_affine ratio": (default(augment.random_affine, "ratio"), tuple(cfg.data.crop_ratio)),
        "dataset.local_dataset_dir cache_dir": (default(dataset.local_dataset_dir, "cache_dir"), cfg.data.cache_dir),
        "sources.fetch_source cache_dir": (default(sources.fetch_source, "cache_dir"), cfg.data.cache_dir),
        "inference.evaluate_folder cache_dir": (default(inference.evaluate_folder, "cache_dir"), cfg.data.cache_dir),
        "prepare.pack_tree stored_size": (default(prepare.pack_tree, "stored_size"), cfg.data.stored_size),
        "prepare.cached_pack stored_size": (default(prepare.cached_pack, "stored_size"), cfg.data.stored_size),
    }
    differ = {name: pair for name, pair in pairs.items() if pair[0] not in (inspect.Parameter.empty, pair[1])}
    assert differ == {}, f"library default != config default: {differ}"
    for fn in (loss.FocalLoss, augment.TrainPreset, augment.train_transform):
        takes = [
            p
            for p in ("gamma", "label_smoothing", "crop_scale", "rotate_deg", "scale")
            if p in inspect.signature(fn).parameters
        ]
        assert all(default(fn, p) is inspect.Parameter.empty for p in takes), fn


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.label_smoothing=1"], r"\(loss.label_smoothing must be in \[0, 1\), not 1.0: 1 would leave no target\)"),
        (
            ["optim.schedule=plateau", "optim.plateau_factor=1"],
            r"optim.schedule=plateau refuses .*Factor should be < 1.0",
        ),
        (["loss.alpha=[1, 2]"], r"\(loss.alpha has 2 values but there are 42 classes\); change that value\.$"),
        (["loss.alpha=[1, 2]", "data.classes=[a, b, c]"], r"loss.alpha has 2 values but there are 3 classes"),
    ],
)
def test_values_the_workers_would_refuse_are_refused_by_the_driver_in_one_sentence(overrides, message):
    from simpsons.driver import check_recipe  # builds model, loss, optimizer and schedule on the CPU, no Ray

    with pytest.raises(ConfigError, match=message) as caught:
        check_recipe(load_config(None, overrides))
    assert len(str(caught.value).splitlines()) == 1 and str(caught.value).endswith(".")
    check_recipe(
        load_config(None, ["loss.label_smoothing=0.99", "optim.schedule=plateau", "optim.plateau_factor=0.99"])
    )
