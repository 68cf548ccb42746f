"""Images per second of batch prediction: jobs/label.py's Ray Data pipeline next to jobs/predict.py.

    python bench/label.py                        # 1,000 images of the real sample, the default model
    python bench/label.py --count 2000 --cpus 2

Both label the same --count image files (copied from the real sample, or --images, into a temporary
folder) with the same checkpoint: predict.py's path (simpsons.inference.predict_files: one process
decodes every file, then runs the model in batches of 128) and label.py's (simpsons.label.label: a
local Ray cluster of --cpus CPUs, decode tasks, a pool of model actors, Parquet written). Prints:

    predict_img_per_s   files over predict_files' wall time (model loading included)
    label_img_per_s     files over label()'s wall time (listing, Ray Data start-up, Parquet included;
                        the Ray cluster is started before the clock runs)
    label_vs_predict    the ratio

Without --checkpoint the model is the default config's network with its initial weights: the
weights do not change the time.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import add_image_args, default_best, emit, image_tree, load_average, note, stdout_to_stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a run's best/ folder (default: see above)")
    add_image_args(parser)
    parser.add_argument("--count", type=int, default=1000, help="image files labelled by each (default: %(default)s)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster (default: this machine's 2)")
    parser.add_argument("--quick", action="store_true", help="100 images: checks that it runs")
    args = parser.parse_args()
    count = 100 if args.quick else args.count

    import ray

    from simpsons.cluster import init_ray
    from simpsons.inference import predict_files
    from simpsons.label import label

    tree = image_tree(args.images, Path(args.cache), args.archive)
    files = sorted(p for p in tree.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[:count]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        for i, path in enumerate(files):  # flat names: the same files for both, nothing else in the folder
            shutil.copyfile(path, folder / "images" / f"{i:06d}{path.suffix}")
        checkpoint = args.checkpoint or str(default_best(folder / "best"))
        note(f"{len(files)} images, load {load_average():.2f}")

        start = time.perf_counter()
        results = predict_files(checkpoint, [folder / "images"], top_k=3, device="cpu")
        predict_rate = len(results) / (time.perf_counter() - start)

        with stdout_to_stderr():
            init_ray(num_cpus=args.cpus, log_to_driver=False)  # workers' lines stay in their logs
            start = time.perf_counter()
            summary = label(checkpoint, str(folder / "images"), str(folder / "labels"))
            label_rate = summary.labelled / (time.perf_counter() - start)
            ray.shutdown()
        note(f"{summary.line(str(folder / 'labels'))} load {load_average():.2f}")
    emit("predict_img_per_s", predict_rate)
    emit("label_img_per_s", label_rate)
    emit("label_vs_predict", label_rate / predict_rate, 3)


if __name__ == "__main__":
    main()
