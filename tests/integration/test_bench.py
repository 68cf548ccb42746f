"""The benchmarks in bench/ run end to end in --quick mode on images the tests write.

Each benchmark runs as a subprocess, exactly as a user runs it, and must print only `name value`
figure lines on stdout (or one `skipped ...` line). The numbers themselves depend on the machine;
what is checked is that every figure is there, positive where it must be, and that the ratios
are the ratios of the printed rates.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from checkpoints import trained_checkpoint

from simpsons.shifts import SHIFTS

BENCH = Path(__file__).resolve().parents[2] / "bench"
FIGURE = re.compile(r"^([a-z0-9_]+) (-?\d+(?:\.\d+)?)$")


def run_bench(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a bench starts its own cluster
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, f"{script} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def figures(stdout: str) -> dict[str, float]:
    """Every stdout line must be `name value`; returns them as a dict."""
    lines = stdout.strip().splitlines()
    assert lines, "the benchmark printed no figures"
    parsed = {}
    for line in lines:
        match = FIGURE.match(line)
        assert match, f"not a `name value` figure line: {line!r}"
        assert match[1] not in parsed, f"figure {match[1]} printed twice"
        parsed[match[1]] = float(match[2])
    return parsed


def assert_ratio(ratio: float, numerator: float, denominator: float) -> None:
    # Printed values are rounded (rates to 0.01, ratios to 0.001).
    assert ratio == pytest.approx(numerator / denominator, rel=0.02, abs=0.002)


def test_throughput_quick_prints_every_figure(image_tree, tmp_path):
    proc = run_bench(
        "throughput.py", "--quick", "--images", str(image_tree), "--cache", str(tmp_path), "--variants", "bf16_nchw"
    )
    got = figures(proc.stdout)
    rates = ["baseline", "baseline_data", "train", "model_step", "data_path", "train_bf16_nchw", "model_step_bf16_nchw"]
    for s in ("", "_mean", "_best"):  # median step, mean over steps, fastest step
        for name in rates:
            assert got[f"{name}_img_per_s{s}"] > 0, name + s
        assert got["train_img_per_s_best"] >= got[f"train_img_per_s{s}"]
        assert_ratio(got[f"speedup_vs_baseline{s}"], got[f"train_img_per_s{s}"], got[f"baseline_img_per_s{s}"])
        assert_ratio(got[f"data_path_fraction{s}"], got[f"train_img_per_s{s}"], got[f"model_step_img_per_s{s}"])
        assert_ratio(
            got[f"data_path_fraction_bf16_nchw{s}"],
            got[f"train_bf16_nchw_img_per_s{s}"],
            got[f"model_step_bf16_nchw_img_per_s{s}"],
        )
    assert (got["image_size"], got["batch_size"], got["threads"], got["timed_steps_per_pipeline"]) == (32, 8, 1, 2)
    assert got["load_avg_1m_start"] >= 0 and got["load_avg_1m_end"] >= 0


def test_throughput_times_each_augmentation_against_the_network_step(image_tree, tmp_path):
    proc = run_bench(
        "throughput.py",
        "--quick",
        "--images",
        str(image_tree),
        "--cache",
        str(tmp_path),
        "--augmentations",
        "jpeg",
        "robust",
    )
    got = figures(proc.stdout)
    for s in ("", "_best"):
        for name in ("model_step", "data_path", "augment_jpeg", "augment_robust"):
            assert got[f"{name}_img_per_s{s}"] > 0, name + s
        for name in ("jpeg", "robust"):
            added = 1 / got[f"augment_{name}_img_per_s{s}"] - 1 / got[f"data_path_img_per_s{s}"]
            assert got[f"augment_{name}_step_fraction{s}"] == pytest.approx(
                added * got[f"model_step_img_per_s{s}"], abs=0.01
            )


def test_throughput_skips_without_the_real_sample(tmp_path):
    proc = run_bench(
        "throughput.py", "--quick", "--archive", str(tmp_path / "missing.tar.xz"), "--cache", str(tmp_path)
    )
    assert proc.stdout.startswith("skipped ") and proc.stdout.count("\n") == 1, proc.stdout
    assert "missing.tar.xz" in proc.stdout and "--images" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu.py measures instead of skipping")
def test_gpu_skips_cleanly_without_cuda(tmp_path):
    proc = run_bench("gpu.py", "--quick", "--cache", str(tmp_path), timeout=120)
    assert proc.stdout.startswith("skipped ") and proc.stdout.count("\n") == 1, proc.stdout
    assert "CUDA is not available" in proc.stdout


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA: the device check runs instead of skipping"
)
def test_device_check_says_skipped_in_one_line_without_cuda():
    make = ["make", "-s", "device-check", f"PYTHON={sys.executable}"]  # no install: the python at hand
    done = subprocess.run(make, cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skipped device check: CUDA is not available") and done.stdout.count("\n") == 1, (
        done.stdout
    )


def test_device_check_quick_runs_on_the_cpu_with_ray_boto3_pyarrow_and_tqdm_uninstalled(tmp_path):
    # As on a bare GPU machine: importing any of them fails (tests/without_packages.py).
    blocked = "ray,boto3,botocore,pyarrow,tqdm,mlflow"
    report = tmp_path / "device_check.json"
    command = [
        sys.executable,
        str(BENCH.parent / "tests" / "without_packages.py"),
        blocked,
        str(BENCH / "device_check.py"),
    ]
    done = subprocess.run(
        [*command, "--quick", "--json", str(report), "--sample", str(tmp_path / "none.npz")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = figures(done.stdout)
    for batch in (8, 16):
        for name in ("step", "step_ema", "model_step"):
            assert got[f"{name}_img_per_s_b{batch}"] > 0
        assert_ratio(
            got[f"data_path_fraction_b{batch}"], got[f"step_img_per_s_b{batch}"], got[f"model_step_img_per_s_b{batch}"]
        )
    for name in ("epoch_train_s", "epoch_evaluate_s", "epoch_checkpoint_s", "ddp_bf16_img_per_s", "ddp_fp16_img_per_s"):
        assert got[name] > 0, name
    assert got["ddp_steps_finite"] == 1 and got["gpu_tests_failed"] == 0 and got["gpu_tests_skipped"] > 0
    assert f"figures written to {report}" in done.stderr
    saved = json.loads(report.read_text())
    assert saved["figures"] == got and saved["device"].startswith("CPU")


def test_gpu_code_path_runs_on_the_cpu_from_an_archive(image_tree, tmp_path):
    # The GPU benchmark's whole path (resident split, step, bare step, epoch with evaluation) on
    # the CPU, fed through --archive: an archive in the real sample's layout, unpacked by the bench.
    archive = tmp_path / "dataset.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(image_tree / "dataset", arcname="dataset")
    proc = run_bench(
        "gpu.py", "--quick", "--device", "cpu", "--archive", str(archive), "--cache", str(tmp_path / "cache")
    )
    got = figures(proc.stdout)
    for name in ("train_step_img_per_s", "model_step_img_per_s", "epoch_img_per_s", "eval_img_per_s", "epoch_s"):
        assert got[name] > 0, name
    assert_ratio(got["data_path_fraction"], got["train_step_img_per_s"], got["model_step_img_per_s"])
    assert (got["image_size"], got["batch_size"]) == (32, 16)
    # Unpacked as training unpacks a source (sources.fetch_source -> archive.safe_extract), keyed by its sha256.
    [unpacked] = (tmp_path / "cache" / "unpacked").iterdir()
    assert (unpacked / "dataset" / "train" / "bart_simpson").is_dir()
    assert f"{unpacked}," in proc.stderr  # trained on the archive's images, not random ones


def test_scaling_quick_runs_one_and_two_ray_workers(image_tree, tmp_path):
    proc = run_bench("scaling.py", "--quick", "--images", str(image_tree), "--cache", str(tmp_path), timeout=400)
    got = figures(proc.stdout)
    assert got["efficiency_w1"] == 1.0
    for workers in (1, 2):
        assert got[f"total_img_per_s_w{workers}"] > 0
        assert_ratio(got[f"per_worker_img_per_s_w{workers}"], got[f"total_img_per_s_w{workers}"], workers)
        assert got[f"fit_s_w{workers}"] > 0
    assert_ratio(got["efficiency_w2"], got["per_worker_img_per_s_w2"], got["per_worker_img_per_s_w1"])
    assert (got["cpus_per_worker"], got["per_worker_batch"], got["image_size"]) == (1, 8, 32)


def test_accuracy_bench_reports_each_recipe_over_seeds(image_tree, tmp_path):
    proc = run_bench(
        "accuracy.py", "--profile", "quick", "--data", str(image_tree), "--recipes", "ema",
        "--seeds", "2", "--target-f1", "0", "--out", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
        "--set", "optim.epochs=1", timeout=600,
    )  # fmt: skip
    got = figures(proc.stdout)
    assert got["seeds"] == 2 and got["budget_s"] == 60
    seeds = [got[f"ema_s{s}_f1_within_budget"] for s in (0, 1)]
    assert got["ema_f1_within_budget_mean"] == pytest.approx(sum(seeds) / 2, abs=1e-4)
    assert 0 <= got["ema_f1_within_budget_std"] and 0 < got["ema_best_val_macro_f1_mean"] <= 1
    # Macro-F1 0 is reached by the first epoch, after its own time.
    first = got["ema_s_to_f1_0_mean"]
    assert got["ema_reached_f1_0"] == 2 and 0 < first <= got["ema_train_s_mean"]
    assert len(list((tmp_path / "runs").glob("quick-ema-s*/best/model.pt2"))) == 2
    assert len(list((tmp_path / "cache" / "packed").glob("*/manifest.json"))) == 1  # packed once, in --cache
    # bench/robustness.py's figures for each seed's best checkpoint, and their mean per recipe
    for seed in (0, 1):
        [worst] = [k for k in got if k.startswith(f"ema_s{seed}_worst_shift_")]
        assert 0 <= got[worst] <= got[f"ema_s{seed}_shifted_mean_val_macro_f1"]
    assert got["ema_shifted_mean_val_macro_f1_mean"] == pytest.approx(
        (got["ema_s0_shifted_mean_val_macro_f1"] + got["ema_s1_shifted_mean_val_macro_f1"]) / 2, abs=1e-4
    )
    # The clean figure is the run's own best validation macro-F1 (the same weights on the same split),
    # but in fp32: training validates on the CPU in bf16, which may turn a prediction of 48.
    assert got["ema_clean_val_macro_f1_mean"] == pytest.approx(got["ema_best_val_macro_f1_mean"], abs=0.1)
    for name in ["clean", *(f"shift_{n}" for n in SHIFTS), "shifted_mean", "worst_shift"]:
        assert 0 <= got[f"ema_{name}_val_macro_f1_mean"] <= 1 and got[f"ema_{name}_val_macro_f1_std"] >= 0, name
    assert got["ema_worst_shift_val_macro_f1_mean"] <= got["ema_shifted_mean_val_macro_f1_mean"]


def test_serving_quick_prints_every_figure(image_tree):
    got = figures(run_bench("serving.py", "--quick", "--images", str(image_tree), "--clients", "4").stdout)
    assert set(got) == {"p50_ms", "p99_ms", "requests_per_s", "failed"}
    assert got["failed"] == 0 and 0 < got["p50_ms"] <= got["p99_ms"] and got["requests_per_s"] > 0


def test_label_quick_prints_every_figure(image_tree):
    got = figures(run_bench("label.py", "--quick", "--images", str(image_tree)).stdout)
    assert set(got) == {"predict_img_per_s", "label_img_per_s", "label_vs_predict"}
    assert_ratio(got["label_vs_predict"], got["label_img_per_s"], got["predict_img_per_s"])


@pytest.mark.parametrize(
    "script, args, networks",
    [  # networks: the ones built that run a forward (the data-only pipelines build none)
        ("throughput.py", ["--quick", "--images", "{tree}", "--cache", "{tmp}"], 3),  # original, step, bare step
        ("gpu.py", ["--quick", "--device", "cpu", "--images", "{tree}", "--cache", "{tmp}"], 2),  # step, bare step
        ("device_check.py", ["--quick", "--no-tests", "--json", "{tmp}/dc.json", "--sample", "{tmp}/none"], 9),
    ],
)
def test_every_timed_pipeline_feeds_the_network_images_of_the_side_it_names(
    script, args, networks, image_tree, tmp_path
):
    # Progressive resizing on (its first epochs at half the side): a pipeline that passes the
    # config's epoch schedule instead of an explicit side would time a smaller image than it names.
    args = [a.format(tree=image_tree, tmp=tmp_path) for a in args] + ["--set", "data.resize_from=0.5"]
    sides = tmp_path / "sides.json"
    command = [sys.executable, str(BENCH.parent / "tests" / "forward_sides.py"), str(sides), str(BENCH / script)]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(sides.read_text())["networks"]
    assert len(seen) >= networks, seen
    assert {side for network in seen for side in network} == {32}, seen  # --quick's 32 px, every forward


def test_device_sample_holds_the_archives_images_as_packing_decodes_them(image_tree, tmp_path):
    # --make-sample on an archive in the real sample's layout; the GPU machine decodes it back.
    sys.path.insert(0, str(BENCH))
    import device_check

    from simpsons.data import find_layout, load_image, scan_split

    archive = tmp_path / "dataset.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(image_tree / "dataset", arcname="dataset")
    sample = tmp_path / "sample.npz"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "device_check.py"),
            "--make-sample",
            "--archive",
            str(archive),
            "--sample",
            str(sample),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout == "", done.stderr
    splits = device_check.load_sample(sample, 40)
    for name in ("train", "val"):
        records = scan_split(find_layout(image_tree).splits[name])
        expected = {(r.label, load_image(r.path.read_bytes(), 40).tobytes()) for r in records}
        images, labels = splits[name]
        assert len(labels) == len(records) <= device_check.PER_CLASS[name] * 42  # few per class here: all kept
        assert {(int(label), image.tobytes()) for image, label in zip(images, labels)} == expected


def test_robustness_quick_prints_clean_each_shift_their_mean_and_the_worst(image_tree, tmp_path):
    best = trained_checkpoint(tmp_path / "best")
    report = tmp_path / "robustness.json"
    args = ["--quick", "--checkpoint", str(best), "--data", str(image_tree), "--cache", str(tmp_path / "cache")]
    got = figures(run_bench("robustness.py", *args, "--json", str(report)).stdout)
    shifted = {name: got.pop(f"shift_{name}_val_macro_f1") for name in SHIFTS}
    [(worst_line, worst)] = [(k, v) for k, v in got.items() if k.startswith("worst_shift_")]
    assert set(got) == {"clean_val_macro_f1", "shifted_mean_val_macro_f1", worst_line, "shifted_mean_vs_clean"}
    # Printed to 4 decimals: the mean of the printed figures is within rounding of the printed mean.
    assert got["shifted_mean_val_macro_f1"] == pytest.approx(sum(shifted.values()) / len(shifted), abs=1e-4)
    assert (
        worst == min(shifted.values()) == shifted[worst_line.removeprefix("worst_shift_").removesuffix("_val_macro_f1")]
    )
    assert_ratio(got["shifted_mean_vs_clean"], got["shifted_mean_val_macro_f1"], got["clean_val_macro_f1"])
    assert len(set(shifted.values())) > 1  # the shifts change what the model predicts
    saved = json.loads(report.read_text())
    assert saved["figures"] == pytest.approx(
        {**got, **{f"shift_{n}_val_macro_f1": v for n, v in shifted.items()}}, abs=5e-5
    )
    assert saved["scores"]["images"] == 48 and saved["scores"]["split"] == "val"  # 12 per class, under --quick's 64
