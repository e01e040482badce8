"""The calibrated package the serving tests share: the shared CASIA checkpoint evaluated on 20 LFW pairs
and exported with thresholds from that run (built once per session by the `calibrated` fixture)."""

from __future__ import annotations

from pathlib import Path

from mfr_ray.config.common import TrackingConfig
from mfr_ray.evaluation.config import EvaluateConfig
from mfr_ray.evaluation.embed import EmbeddingSet
from mfr_ray.evaluation.runner import evaluate, load_pairs
from mfr_ray.evaluation.verification import cosine_scores
from mfr_ray.serve.export import export_package

NO_EXTRAS = {"identification": False, "open_set": False, "clustering": False, "classifiers": False,
             "mask_matrix": False}
# 10 impostor pairs: FAR 0.1 is resolvable (1/10 <= 0.1), FAR 1e-3 is not.
FARS = (0.1, 1e-3)
MASKED_VARIANT = "N95"  # the evaluation's masked variant: the package's masked-pair thresholds come from it


def calibrated_evaluation(root: Path) -> dict:
    """Evaluate the shared checkpoint on the first 5 genuine + 5 impostor pairs of LFW folds 1-2 and export
    it calibrated on that run. Returns what the tests compare against. The evaluation's crop and embedding
    cache is shared by the session's test modules (beside `root`), so only the first one aligns."""
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    cfg = EvaluateConfig(
        name="lfw-serve", pairs={"limit_folds": 2, "max_pairs_per_fold": 10}, analyses=NO_EXTRAS,
        sources={"unmasked": {}, MASKED_VARIANT: {"variant": MASKED_VARIANT}},  # masked on the photo, then aligned
        cache_dir=str(root.parent / "serve-eval-cache"), output_dir=str(root / "eval"), far_targets=[0.1],
        tracking=tracking,
    )
    summary = evaluate(cfg, progress=False)
    exported = export_package(summary["run_id"], root / "package", fars=FARS, tracking=tracking,
                              register_name="lfw-serve-package")
    pairs = load_pairs(cfg)
    embeddings = EmbeddingSet.load(root / "eval" / "lfw-serve" / "embeddings.npz")
    index = {k: i for i, k in enumerate(embeddings.keys)}
    features = embeddings.features("sum")
    scores = cosine_scores(features[[index[k] for k in pairs.left]], features[[index[k] for k in pairs.right]])
    return {"cfg": cfg, "summary": summary, "export": exported, "pairs": pairs, "scores": scores,
            "tracking": tracking, "package": str(root / "package"),
            "kind_scores": root / "eval" / "lfw-serve" / "pair_scores.npz"}
