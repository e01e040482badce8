"""`mfr tune` as a Ray job: `python jobs/tune.py CONFIG [key=value ...] [--restart]`.

    ray job submit --working-dir . -- python jobs/tune.py configs/tune_beta_margin.yaml

The working_dir goes first on the job's PYTHONPATH, so the job runs the uploaded `mfr_ray`.
"""

from mfr_ray.cli import run_job

if __name__ == "__main__":
    run_job("tune")
