"""Train a recognizer: `python jobs/train.py --config configs/train_*.yaml [key=value ...]`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/train.py --config configs/train_mobilefacenet_distill.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.train import TrainConfig, train_and_report

if __name__ == "__main__":
    cfg, args = parse_job_args(
        __doc__.splitlines()[0], TrainConfig,
        add_arguments=lambda p: p.add_argument("--run-name", help="run name (default: the config's); reuse to resume"),
    )
    sys.exit(train_and_report(cfg, run_name=args.run_name))
