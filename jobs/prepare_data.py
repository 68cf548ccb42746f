"""Turn a raw image source into a versioned, validated, packed dataset in object storage.

    python jobs/prepare_data.py --dest s3://my-bucket/simpsons                 # the published Drive folder
    python jobs/prepare_data.py --source ../shared/data/simpsons_dataset --dest s3://my-bucket/simpsons
    python jobs/prepare_data.py --source ~/kaggle/simpsons.zip --dest s3://b/simpsons --version kaggle-v1
    AWS_ENDPOINT_URL=http://127.0.0.1:9000 python jobs/prepare_data.py --source ... --dest s3://b/p   # MinIO

Writes <dest>/datasets/<name>/<version>/ (originals/, packed arrays, report.json, manifest.json
last) and prints the data.uri to train on. Re-running with the same inputs sends nothing twice;
an interrupted run, re-run, completes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from simpsons.cli import add_config_args, run_job  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", help="Drive folder/file link, http(s) URL, local folder or archive (default: data.source)"
    )
    parser.add_argument(
        "--dest", required=True, help="s3://bucket/prefix (or a local folder) that receives datasets/<name>/<version>/"
    )
    parser.add_argument("--name", default="simpsons", help="dataset name (default: simpsons)")
    parser.add_argument(
        "--version", default="v1", help="dataset version; a complete version is never changed (default: v1)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.15, help="val share per class when the source has no split"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that split")
    add_config_args(
        parser,
        config_help="YAML config; data.stored_size, data.pack_workers, data.cache_dir, data.classes, "
        "data.max_image_bytes and run.s3_endpoint are used",
        set_help="override a config value, e.g. --set data.stored_size=128 (repeatable)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    from simpsons.config import load_config
    from simpsons.prepare import prepare_dataset

    cfg = load_config(args.config, args.set)
    prepare_dataset(
        args.source or cfg.data.source,
        args.dest,
        args.name,
        args.version,
        cfg.data.stored_size,
        cfg.data.pack_workers,
        cfg.data.cache_dir,
        cfg.run.s3_endpoint,
        args.val_fraction,
        args.seed,
        class_names=cfg.data.classes,
        max_image_bytes=cfg.data.max_image_bytes,
    )


if __name__ == "__main__":
    run_job(main, get_args_parser())
