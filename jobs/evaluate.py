"""Evaluate a recognizer: `python jobs/evaluate.py --config configs/eval_*.yaml [key=value ...]`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/eval_lfw.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config import ConfigError, load_config
from mfr_ray.evaluation.config import EvaluateConfig
from mfr_ray.evaluation.runner import evaluate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config of kind `evaluate`")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, expected=EvaluateConfig)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    summary = evaluate(cfg)
    print((Path(cfg.output_dir) / cfg.name / "report.md").read_text())
    print(f"mlflow run: {summary.get('run_id')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
