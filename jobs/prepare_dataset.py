"""`mfr prepare` as a Ray job: `python jobs/prepare_dataset.py CONFIG [key=value ...] [--no-progress]`.

    ray job submit --working-dir . -- python jobs/prepare_dataset.py configs/prepare_lfw_eval.yaml

The working_dir goes first on the job's PYTHONPATH, so the job runs the uploaded `mfr_ray`.
"""

from mfr_ray.cli import run_job

if __name__ == "__main__":
    run_job("prepare")
