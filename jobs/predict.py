"""Top-k character predictions for images.

python jobs/predict.py --checkpoint runs/local/best some.jpg other.png folder_of_images/ --top-k 3
    python jobs/predict.py --checkpoint runs/local/best/model.pt2 some.jpg   # the exported model: torch alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, help="a run's best/ folder, a checkpoint.pt, or the exported best/model.pt2"
    )
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the first GPU when there is one, else the CPU)")
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons.inference import predict_files

    for result in predict_files(args.checkpoint, args.images, args.top_k, device=args.device):
        if args.json:
            print(json.dumps(result))
        elif "error" in result:
            print(f"{result['path']}: {result['error']}")
        else:
            labels = ", ".join(f"{t['label']} {t['prob']:.2f}" for t in result["top"])
            print(f"{result['path']}: {labels}")


if __name__ == "__main__":
    run_job(main, get_args_parser())
