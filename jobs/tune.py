"""Ray job entrypoint: `python jobs/tune.py --config configs/tune_beta_margin.yaml [--restart] [key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.tune import SearchChangedError, TuneConfig, print_search, run_search

if __name__ == "__main__":
    cfg, args = parse_job_args(
        __doc__, TuneConfig,
        add_arguments=lambda p: p.add_argument(
            "--restart", action="store_true", help="start the search afresh (new MLflow parent run)"
        ),
    )
    if args.restart:
        cfg.resume = False
    try:
        result = run_search(cfg)
    except SearchChangedError as exc:
        sys.exit(f"{exc}")  # exit status 1, the reason on stderr
    print_search(cfg, result)
