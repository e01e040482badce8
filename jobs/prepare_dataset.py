"""Prepare a training/evaluation dataset: `python jobs/prepare_dataset.py --config configs/prepare_*.yaml`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/prepare_dataset.py --config configs/prepare_lfw_eval.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.job import prepare_and_report

if __name__ == "__main__":
    cfg, args = parse_job_args(
        __doc__.splitlines()[0], PrepareConfig,
        add_arguments=lambda p: p.add_argument("--no-progress", action="store_true", help="no progress bar"),
    )
    sys.exit(prepare_and_report(cfg, progress=not args.no_progress))
