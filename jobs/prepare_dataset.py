"""Prepare a training/evaluation dataset: `python jobs/prepare_dataset.py --config configs/prepare_*.yaml`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/prepare_dataset.py --config configs/prepare_lfw_eval.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config import ConfigError, load_config
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.job import prepare_and_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config of kind `prepare`")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, expected=PrepareConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return prepare_and_report(cfg, progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
