"""Evaluate a recognizer: `python jobs/evaluate.py --config configs/eval_*.yaml [key=value ...]`.

Also submittable to a running cluster:
    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/eval_lfw.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the package, also from a job's working_dir

from mfr_ray.config.job_args import parse_job_args
from mfr_ray.evaluation.config import EvaluateConfig
from mfr_ray.evaluation.runner import evaluate

if __name__ == "__main__":
    cfg, _ = parse_job_args(__doc__.splitlines()[0], EvaluateConfig)
    summary = evaluate(cfg)
    print((Path(cfg.output_dir) / cfg.name / "report.md").read_text())
    print(f"mlflow run: {summary.get('run_id')}")
