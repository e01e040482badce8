"""`mfr train` as a Ray job: `python jobs/train.py CONFIG [key=value ...] [--run-name NAME]`.

    ray job submit --working-dir . -- python jobs/train.py configs/train_mobilefacenet_distill.yaml

The working_dir goes first on the job's PYTHONPATH, so the job runs the uploaded `mfr_ray`.
"""

from mfr_ray.cli import run_job

if __name__ == "__main__":
    run_job("train")
