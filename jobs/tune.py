"""Ray job entrypoint: `python jobs/tune.py --config configs/tune_beta_margin.yaml [key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.tune import TuneConfig, print_search, run_search

if __name__ == "__main__":
    cfg, _ = parse_job_args(__doc__, TuneConfig)
    print_search(cfg, run_search(cfg))
