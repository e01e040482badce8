"""Training on Ray Train: ArcFace (or CosFace/softmax) on unmasked and masked crops plus masked->unmasked
distillation, or the FaceNet triplet baseline; DDP workers fed by Ray Data, checkpoints, MLflow.

`run_training(TrainConfig)` runs one training run; `train_loop_per_worker` is the worker function (also
used inside Tune trials). Torch and Ray load lazily so importing the config stays light.
"""

from mfr_ray import lazy_attributes
from mfr_ray.train.config import TrainConfig

_LAZY = {
    "TrainingOutcome": "mfr_ray.train.trainer",
    "run_training": "mfr_ray.train.trainer",
    "train_and_report": "mfr_ray.train.trainer",
    "train_loop_per_worker": "mfr_ray.train.loop",
}

__all__ = ["TrainConfig", "TrainingOutcome", "run_training", "train_and_report", "train_loop_per_worker"]

__getattr__ = lazy_attributes(__name__, _LAZY)
