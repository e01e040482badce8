"""`mfr evaluate` as a Ray job: `python jobs/evaluate.py CONFIG [key=value ...] [--output-dir DIR]`.

    ray job submit --working-dir . -- python jobs/evaluate.py configs/eval_lfw.yaml

The working_dir goes first on the job's PYTHONPATH, so the job runs the uploaded `mfr_ray`.
"""

from mfr_ray.cli import run_job

if __name__ == "__main__":
    run_job("evaluate")
