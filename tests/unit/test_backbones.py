"""torchvision backbones and their starting weights (model.arch, model.weights), on the CPU.

The weights are files these tests write. For `imagenet` the one call that would leave the machine,
torch.hub.download_url_to_file, is replaced by a copy of such a file; everything around it (the
node's cache, the lock, the file name carrying the hash prefix, the partial file, loading) is real.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
import torch
import torchvision
from tiny import random_split, tiny_config

from simpsons.augment import MEAN, STD
from simpsons.config import load_config
from simpsons.data import CLASS_NAMES, DataError
from simpsons.driver import check_recipe
from simpsons.model import ARCHS, create_model, is_head
from simpsons.recipe import Plan, build_components, create_scheduler, create_train_step
from simpsons.weights import load_weights

FINETUNE = Path(__file__).resolve().parents[2] / "configs" / "finetune.yaml"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gives_one_logit_per_class(arch):
    model = create_model(42, arch=arch).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 42)
    assert any(is_head(arch, name) for name, _ in model.named_parameters())


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "original"])
def test_the_weights_preset_normalises_as_the_project_does(arch):
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    assert (tuple(preset.mean), tuple(preset.std)) == (MEAN, STD)


def imagenet_like(arch: str, path) -> dict:
    """A state dict shaped like torchvision's published file for `arch` (1000 classes), saved at `path`."""
    torch.manual_seed(1)
    state = torchvision.models.get_model(arch, num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def serve_as_download(monkeypatch, published: Path) -> list[tuple]:
    """torch.hub's download from download.pytorch.org replaced by a copy of `published`; the
    returned list collects each call's (url, hash_prefix, progress)."""
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix, progress))
        shutil.copy(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def test_imagenet_weights_are_downloaded_once_per_node_and_loaded_but_the_classifier(tmp_path, monkeypatch):
    published = imagenet_like("resnet18", tmp_path / "published.pth")
    calls = serve_as_download(monkeypatch, tmp_path / "published.pth")
    cache = tmp_path / "cache"
    for _ in range(2):
        model = create_model(42, arch="resnet18")
        load_weights(model, "resnet18", "imagenet", cache)
    # Once per node, with the hash prefix that the published file's name carries, and a progress bar.
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd", True)]
    assert sorted(p.name for p in (cache / "weights").iterdir()) == [".lock", "resnet18-f37072fd.pth"]  # no partial
    state = model.state_dict()
    assert torch.equal(state["layer4.1.conv2.weight"], published["layer4.1.conv2.weight"])
    assert state["fc.weight"].shape == (42, 512)  # sized for this run's classes, not ImageNet's 1000


def test_a_download_that_fails_its_checksum_leaves_nothing_behind(tmp_path, monkeypatch):
    def download(url, dst, hash_prefix=None, progress=True):  # what torch.hub does on a hash mismatch
        open(dst, "wb").write(b"not the weights")
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0badc0de")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with pytest.raises(DataError, match="does not match its published checksum") as caught:
        load_weights(create_model(42, arch="resnet18"), "resnet18", "imagenet", tmp_path)
    assert len(str(caught.value).splitlines()) == 1
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [".lock"]  # the partial is gone


def test_the_original_network_has_no_imagenet_weights(tmp_path):
    with pytest.raises(DataError, match="needs a torchvision model.arch"):
        load_weights(create_model(42), "original", "imagenet", tmp_path)


def test_a_state_dict_file_or_a_checkpoint_of_this_project_is_loaded(tmp_path):
    source = create_model(42, arch="mobilenet_v3_large")
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    torch.save({"model": source.state_dict(), "config": {}, "class_names": []}, tmp_path / "checkpoint.pt")
    for name in ("weights.pt", "checkpoint.pt"):
        model = create_model(42, arch="mobilenet_v3_large")
        load_weights(model, "mobilenet_v3_large", str(tmp_path / name), tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_weights_from_s3(tmp_path, s3_server):
    boto3.client("s3").create_bucket(Bucket="weights")
    source = create_model(42, arch="resnet18")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    boto3.client("s3").upload_file(str(tmp_path / "w.pt"), "weights", "resnet18/w.pt")
    model = create_model(42, arch="resnet18")
    load_weights(model, "resnet18", "s3://weights/resnet18/w.pt", tmp_path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    with pytest.raises(DataError, match="there is no object at s3://weights/nothing.pt"):
        load_weights(model, "resnet18", "s3://weights/nothing.pt", tmp_path)


def test_weights_of_another_architecture_or_not_weights_at_all_are_one_sentence(tmp_path):
    torch.save(create_model(42, arch="resnet18").state_dict(), tmp_path / "resnet18.pt")
    (tmp_path / "notes.txt").write_text("not a state dict")
    for spec, complaint in [
        (tmp_path / "resnet18.pt", "does not fit model.arch=resnet50"),
        (tmp_path / "notes.txt", "torch cannot read"),
        (tmp_path / "absent.pt", "is not a file"),
    ]:
        with pytest.raises(DataError, match=complaint) as caught:
            load_weights(create_model(42, arch="resnet50"), "resnet50", str(spec), tmp_path)
        assert len(str(caught.value).splitlines()) == 1


def test_fine_tuning_trains_the_backbone_slower_than_the_new_classifier(tmp_path):
    torch.save(create_model(42, arch="resnet18").state_dict(), tmp_path / "w.pt")
    counts = [10] * 42
    overrides = ["model.arch=resnet18", "optim.lr=0.01", "optim.backbone_lr_scale=0.1", f"data.cache_dir={tmp_path}"]
    _, _, tuned = build_components(
        load_config(None, overrides + [f"model.weights={tmp_path / 'w.pt'}"]), counts, torch.device("cpu")
    )
    head, head_no_decay, backbone, backbone_no_decay = tuned.param_groups
    assert head["lr"] == head_no_decay["lr"] == 0.01
    assert backbone["lr"] == backbone_no_decay["lr"] == pytest.approx(0.001)
    assert [p.shape for p in head["params"] + head_no_decay["params"]] == [(42, 512), (42,)]
    assert sum(p.numel() for g in tuned.param_groups for p in g["params"]) == 11_198_058
    _, _, fresh = build_components(load_config(None, overrides), counts, torch.device("cpu"))
    assert {g["lr"] for g in fresh.param_groups} == {0.01}  # nothing loaded: one rate


def test_the_fine_tuning_recipe_trains_from_the_published_weights(tmp_path, monkeypatch):
    shipped = load_config(FINETUNE)
    arch, lr, scale = shipped.model.arch, shipped.optim.lr, shipped.optim.backbone_lr_scale
    assert (shipped.model.weights, shipped.data.train_size, shipped.data.resize_from) == ("imagenet", 224, 1)
    assert 0 < scale < 1 and shipped.train.precision == "auto"
    published = imagenet_like(arch, tmp_path / "published.pth")
    downloads = serve_as_download(monkeypatch, tmp_path / "published.pth")
    cfg = tiny_config(f"data.cache_dir={tmp_path}", path=FINETUNE)  # the shipped recipe at a tiny side and batch
    check_recipe(cfg)  # what the driver builds before Ray starts

    device = torch.device("cpu")
    model, criterion, optimizer = build_components(cfg, [10] * len(CLASS_NAMES), device)
    assert len(downloads) == 1
    stem = next(key for key, value in published.items() if value.ndim == 4)  # the first convolution
    assert torch.equal(model.state_dict()[stem], published[stem])
    head, head_no_decay, backbone, backbone_no_decay = optimizer.param_groups
    assert [p.shape for p in head["params"] + head_no_decay["params"]] == [(42, 1280), (42,)]  # new, 42 classes
    assert head["lr"] == head_no_decay["lr"] == lr
    assert backbone["lr"] == backbone_no_decay["lr"] == pytest.approx(lr * scale)

    scheduler = create_scheduler(optimizer, cfg, steps_per_epoch=4)
    step = create_train_step(cfg, model, criterion, optimizer, scheduler)
    rates = [group["lr"] for group in optimizer.param_groups]  # this step's, warm-up included
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    images, labels = next(random_split(8).train_batches(0, 8, cfg.train.seed))
    loss, logits = step(images, labels, Plan.of(cfg, device).train_preset(0), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logits.shape == (8, 42)
    # AdamW's first step moves each weight by about its rate (m / sqrt(v) is the gradient's sign):
    # the new classifier by the full rate, the pretrained stem by backbone_lr_scale of it.
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    assert moved["classifier.1.weight"] == pytest.approx(rates[0], rel=0.02)
    assert moved[stem] == pytest.approx(rates[2], rel=0.02) and rates[2] == pytest.approx(rates[0] * scale)
