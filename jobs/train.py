"""Train a recognizer: `python jobs/train.py --config configs/train_*.yaml [key=value ...]`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/train.py --config configs/train_mobilefacenet_distill.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config import ConfigError, load_config
from mfr_ray.train import TrainConfig, train_and_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config of kind `train`")
    parser.add_argument(
        "--run-name", default=None, help="run name (default: the config's name); reuse to resume"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, expected=TrainConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return train_and_report(cfg, run_name=args.run_name)


if __name__ == "__main__":
    sys.exit(main())
