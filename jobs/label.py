"""Label every image under a prefix with a trained model (Ray Data batch prediction) into Parquet.

    ray job submit --working-dir . -- python jobs/label.py \\
        --checkpoint s3://bucket/runs/simpsons/best --data s3://bucket/frames/ --out s3://bucket/labels/
    python jobs/label.py --checkpoint runs/local/best --data frames/ --out labels/    # a local Ray

One row per image (path, label, top-k labels and probabilities, error, model provenance); a rerun
on the same --out labels only what is not there yet. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="a run's best/ folder, its checkpoint.pt or model.pt2 (local or s3://)"
    )
    parser.add_argument("--data", required=True, help="folder or s3:// prefix of the images (searched recursively)")
    parser.add_argument("--out", required=True, help="folder or s3:// prefix for the Parquet files")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument(
        "--gpus", type=int, help="model replicas on 1 GPU each (default: the GPUs the cluster has now; 0: CPUs)"
    )
    parser.add_argument("--cpu-actors", type=int, default=2, help="model replicas on 1 CPU each when there is no GPU")
    parser.add_argument("--batch-size", type=int, help="images per model call (default: 256 on a GPU, 32 on a CPU)")
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons.label import label

    summary = label(args.checkpoint, args.data, args.out, args.top_k, args.gpus, args.cpu_actors, args.batch_size)
    print(summary.line(args.out))


if __name__ == "__main__":
    run_job(main, get_args_parser())
