import json

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import make_image_tree

from simpsons.augment import MEAN, STD, eval_transform, train_transform
from simpsons.config import load_config
from simpsons.data import (
    CLASS_NAMES,
    DataError,
    ResidentSplit,
    data_placement,
    find_layout,
    host_available_bytes,
    pack_split,
    placement,
    scan_split,
)
from simpsons.dataset import load_packed, read_manifest
from simpsons.prepare import pack_tree
from simpsons.recipe import create_eval_preset, create_train_preset


def test_labels_come_from_the_fixed_class_list(image_tree):
    records = scan_split(find_layout(image_tree).splits["train"])
    labels = {r.relpath.split("/")[1]: r.label for r in records}
    assert labels == {name: CLASS_NAMES.index(name) for name in labels}
    assert any(r.path.suffix == ".png" for r in records) and any(r.path.suffix == ".jpg" for r in records)


def test_pack_writes_arrays_counts_and_manifest_last(packed_dataset):
    manifest = read_manifest(packed_dataset)
    assert manifest["class_names"] == list(CLASS_NAMES)
    images, labels = load_packed(packed_dataset, "train")
    assert images.shape == (160, 40, 40, 3) and images.dtype == np.uint8
    assert manifest["splits"]["train"]["class_counts"][CLASS_NAMES.index("bart_simpson")] == 40
    assert sum(manifest["splits"]["val"]["class_counts"]) == 48
    assert len(manifest["sources"]) == 160 + 48
    assert all(len(h) == 64 for h in manifest["sources"].values())


def test_corrupt_and_empty_files_are_reported_and_left_out(tmp_path):
    root = make_image_tree(tmp_path / "src", per_split={"train": 3, "val": 2}, size=32)
    bart = root / "dataset" / "train" / "bart_simpson"
    (bart / "empty.jpg").write_bytes(b"")
    (bart / "notes.jpg").write_text("not an image at all")
    good = (bart / "pic_0000.jpg").read_bytes()
    (bart / "truncated.jpg").write_bytes(good[: len(good) // 2])
    pack_tree(root, tmp_path / "packed", stored_size=32, workers=1)
    report = json.loads((tmp_path / "packed" / "report.json").read_text())
    bad = {b["path"].split("/")[-1]: b["reason"] for b in report["bad_files"]["train"]}
    assert set(bad) == {"empty.jpg", "notes.jpg", "truncated.jpg"}
    assert "0 bytes" in bad["empty.jpg"] and "cannot decode" in bad["notes.jpg"]
    _, labels = load_packed(tmp_path / "packed", "train")
    assert len(labels) == 4 * 3


def test_unknown_class_folder_is_refused_with_its_name(tmp_path):
    root = make_image_tree(tmp_path, per_split={"train": 2}, size=32)
    (root / "dataset" / "train" / "bartman").mkdir()
    with pytest.raises(
        DataError, match=r"1 unknown class folder\(s\) \(not one of the 42 known classes\): train/bartman;"
    ):
        scan_split(root / "dataset" / "train")


def test_any_image_mode_is_converted_to_rgb(tmp_path):
    folder = tmp_path / "train" / "gil"
    folder.mkdir(parents=True)
    Image.new("L", (20, 30), 128).save(folder / "grey.png")
    Image.new("RGBA", (30, 20), (255, 0, 0, 10)).save(folder / "alpha.png")
    Image.new("P", (25, 25)).save(folder / "palette.gif")
    packed = pack_split(scan_split(tmp_path / "train"), size=16, workers=1)
    assert packed.images.shape == (3, 16, 16, 3) and not packed.bad_files


def test_train_batches_shard_the_epoch_without_overlap_and_are_seeded():
    split = ResidentSplit(np.zeros((103, 8, 8, 3), np.uint8), np.arange(103) % 42)
    split.labels = torch.arange(103)  # use labels as image ids
    shards = [
        [int(i) for _, y in split.train_batches(epoch=0, batch_size=10, seed=1, rank=r, world=2) for i in y]
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 51  # equal step counts on every rank
    assert not set(shards[0]) & set(shards[1])
    again = [int(i) for _, y in split.train_batches(0, 10, 1, 0, 2) for i in y]
    other_epoch = [int(i) for _, y in split.train_batches(1, 10, 1, 0, 2) for i in y]
    assert again == shards[0] and other_epoch != shards[0]
    assert split.steps_per_epoch(10, world=2) == 6


def test_eval_batches_cover_every_image_once():
    split = ResidentSplit(np.zeros((11, 4, 4, 3), np.uint8), np.arange(11))
    seen = sorted(int(i) for r in range(3) for _, y in split.eval_batches(4, r, 3) for i in y)
    assert seen == list(range(11))


def test_host_memory_path_gives_exactly_the_resident_batches():
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (37, 8, 8, 3), dtype=np.uint8), rng.integers(0, 42, 37)
    resident, host = ResidentSplit(images, labels), ResidentSplit(images, labels, on_device=False)
    assert not host.on_device and host.images.device.type == "cpu"  # gathered per batch, then copied
    for rank in range(2):
        pairs = [
            *zip(resident.train_batches(3, 5, 7, rank, 2), host.train_batches(3, 5, 7, rank, 2)),
            *zip(resident.eval_batches(6, rank, 2), host.eval_batches(6, rank, 2)),
        ]
        assert len(pairs) == 4 + (4 if rank == 0 else 3)  # 18 train images per rank; 19 and 18 to evaluate
        for (x, y), (hx, hy) in pairs:
            assert torch.equal(x, hx) and torch.equal(y, hy) and hx.dtype == torch.uint8


def test_placement_keeps_data_on_the_gpu_within_its_share_else_in_host_memory_that_holds_it():
    gib, sample = 2**30, 845 * 2**20  # today's train + val at 144 px
    on_gpu, reason = placement(sample, "cuda:0", 10 * gib, 0.5, 64 * gib)  # 10 GiB free of a 24 GiB GPU
    assert on_gpu and reason == "resident on cuda:0 (845 MiB, within 50% of the 10.0 GiB free on cuda:0)"
    on_gpu, reason = placement(25 * sample, "cuda:0", 10 * gib, 0.5, 64 * gib)
    assert not on_gpu and reason.startswith("in host memory (the page cache), gathered per batch into pinned buffers")
    assert "21125 MiB is more than 50%" in reason
    assert not placement(sample, "cuda:0", 10 * gib, 0.0, 64 * gib)[0]  # share 0 forces the host path
    # Neither fits: one sentence naming the setting and the host's memory, not a node that swaps.
    with pytest.raises(
        DataError,
        match=r"fit neither 50% of the 10.0 GiB free on cuda:0 \(data.resident_share\) nor the 16.0 GiB of available host memory",
    ):
        placement(25 * sample, "cuda:0", 10 * gib, 0.5, 16 * gib)
    assert data_placement(sample, "cpu", 0.5) == (True, "in host memory (845 MiB): training on the CPU")
    assert 0 < host_available_bytes() < 2**50


def test_host_path_keeps_the_split_pageable():
    # On a GPU machine the batches are pinned (tests/gpu/test_gpu.py); the split itself is the memory map.
    images, labels = np.zeros((6, 8, 8, 3), np.uint8), np.arange(6)
    split = ResidentSplit(images, labels, device="cpu", on_device=False)
    assert not split.images.is_pinned() and split.images.data_ptr() == torch.from_numpy(images).data_ptr()


def test_augmentation_shapes_ranges_and_determinism():
    rng = np.random.default_rng(0)
    images = torch.as_tensor(rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8))
    x, y, z = (train_transform(images, 32, (0.6, 1.0), 15.0, True, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, y) and not torch.equal(x, z)
    lo = (0 - max(MEAN)) / min(STD)
    hi = (1 - min(MEAN)) / min(STD)
    assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4


def test_eval_transform_is_a_plain_resize_of_a_flat_image():
    images = torch.full((2, 40, 40, 3), 255, dtype=torch.uint8)
    x = eval_transform(images, 32)
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[0, :, 16, 16], expected)


def test_identity_crop_without_flip_or_rotation_keeps_the_image():
    images = torch.as_tensor(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    x = train_transform(
        images,
        32,
        scale=(1.0, 1.0),
        rotate_deg=0.0,
        hflip=False,
        ratio=(1.0, 1.0),
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(x, eval_transform(images, 32), atol=1e-4, rtol=0)


def test_flip_mirrors_the_image():
    half = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    half[:, :, :16] = 255  # left half white
    gen = torch.Generator().manual_seed(0)
    outs = [
        train_transform(half, 32, scale=(1.0, 1.0), rotate_deg=0.0, hflip=True, ratio=(1.0, 1.0), generator=gen)
        for _ in range(16)
    ]
    left_bright = {bool(o[0, 0, 16, :8].mean() > o[0, 0, 16, 24:].mean()) for o in outs}
    assert left_bright == {True, False}  # both orientations occur


@pytest.mark.parametrize("channels_last", [False, True])
def test_presets_give_the_memory_layout_the_config_asks_for(channels_last):
    # train.channels_last=false must feed contiguous NCHW: a channels_last input makes the
    # convolutions run channels_last even with NCHW weights, whatever the setting says.
    images = torch.as_tensor(np.random.default_rng(2).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8))
    made = {}
    for augment in (True, False):
        cfg = load_config(
            None,
            [
                f"train.channels_last={str(channels_last).lower()}",
                "data.train_size=32",
                "data.stored_size=40",
                f"data.augment={str(augment).lower()}",
            ],
        )
        made[f"train, augment {augment}"] = create_train_preset(cfg)(images, torch.Generator().manual_seed(0))
        made[f"eval, augment {augment}"] = create_eval_preset(cfg)(images)
    for name, x in made.items():
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32, name
        assert x.is_contiguous() is not channels_last, name
        assert x.is_contiguous(memory_format=torch.channels_last) is channels_last, name
    # The layout is all that changes: the same numbers either way.
    torch.testing.assert_close(made["eval, augment True"], eval_transform(images, 32))
    torch.testing.assert_close(made["train, augment False"], made["eval, augment False"])
