"""End to end on the embedded default: `python jobs/quickstart.py --config configs/quickstart.yaml [--quick]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.quickstart import QuickstartConfig, print_outcome, run_quickstart

if __name__ == "__main__":
    cfg, args = parse_job_args(
        __doc__, QuickstartConfig,
        add_arguments=lambda p: p.add_argument("--quick", action="store_true", help="a few identities and steps"),
    )
    if args.quick:
        cfg.quick = True
    print_outcome(cfg, run_quickstart(cfg))
