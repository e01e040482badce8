"""`mfr quickstart` as a script or Ray job: `python jobs/quickstart.py [CONFIG] [key=value ...] [--quick]`
(CONFIG defaults to configs/quickstart.yaml)."""

from mfr_ray.cli import run_job

if __name__ == "__main__":
    run_job("quickstart")
