"""The end-to-end quickstart: prepare CelebA-299 training pairs and the LFW-SM evaluation variants, train
the "no-mask" and the "mask" network from the shared CASIA MobileFaceNet on the same data and budget, and
the "frozen-teacher" network (distilled toward the frozen checkpoint) on a smaller one, evaluate them and the
untouched checkpoint, and print the comparison. Each stage is its own config in `configs/`; this only
points them at one output folder and chains their results."""

from __future__ import annotations

import csv
import hashlib
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from mfr_ray.config import StrictModel, load_config
from mfr_ray.config.base import deprecated_spelling
from mfr_ray.config.common import TrackingConfig
from mfr_ray.evaluation.metric_names import VerificationMetricName, metric_key, verification_metrics
from mfr_ray.storage import join_uri, write_bytes

if TYPE_CHECKING:
    from mfr_ray.models.spec import ModelSpec

STAGES = ("prepare_train", "prepare_eval", "train_nomask", "train_mask", "train_teacher", "evaluate", "calibrate")
CHECKPOINT = "CASIA checkpoint (untouched)"
NOMASK, MASK, TEACHER = "no-mask network", "mask network", "frozen-teacher network"
TRAINED = {"train_nomask": NOMASK, "train_mask": MASK, "train_teacher": TEACHER}
# (model, reference, key suffix) of the headline figures: the paper's claim against the no-mask network,
# and each masked network against the checkpoint both started from (the gain must not be forgetting).
HEADLINE_PAIRS = (
    (MASK, NOMASK, ""),
    (MASK, CHECKPOINT, "_vs_checkpoint"),
    (TEACHER, CHECKPOINT, "_frozen_teacher_vs_checkpoint"),
)


class StageConfig(StrictModel):
    """A stage's config file. Its own settings belong in a small file that starts from the shipped one with
    `base:` (configs/quickstart/train_*.yaml); `overrides` (key=value, the earlier spelling) still work."""

    config: str
    overrides: list[str] = Field(default_factory=list)

    _overrides_deprecated = deprecated_spelling(
        "overrides", "a quickstart stage's `overrides:` - write a file with `base: <the stage's config>` and the "
        "values instead (configs/quickstart/train_nomask.yaml)")


class QuickstartConfig(StrictModel):
    name: str = "quickstart"
    output_root: str = "outputs/quickstart"
    prepare_train: StageConfig = StageConfig(config="configs/prepare_celeba_112x96.yaml")
    prepare_eval: StageConfig = StageConfig(config="configs/prepare_lfw_eval.yaml")
    train_nomask: StageConfig = StageConfig(config="configs/train_nomask.yaml")
    train_mask: StageConfig = StageConfig(config="configs/train_mobilefacenet_distill.yaml")
    train_teacher: StageConfig = StageConfig(config="configs/train_mobilefacenet_teacher.yaml")
    evaluate: StageConfig = StageConfig(config="configs/eval_lfw_sm.yaml")
    calibrate: StageConfig = Field(StageConfig(config="configs/quickstart/calibrate.yaml"), description="the "
                                   "evaluation the served package's thresholds come from (masked photos aligned "
                                   "as deployed)")
    search_calibration_identities: int = Field(299, ge=0, description="CelebA-299 people (one photo each, bare "
                                               "and masked with held-out masks) whose faces calibrate the package's "
                                               "per-search rates (/identify?fpir=); 0: none. The quick variant takes 12")
    quick: bool = Field(False, description="a few identities and one epoch (the test-suite variant)")
    quick_overrides: dict[str, list[str]] = Field(default_factory=dict, description="stage -> overrides for quick")
    headline_variant: str = "mixed"
    headline_metric: VerificationMetricName = Field(
        metric_key("tpr", 1e-3, stat=None), description="verification metric of the table and headline"
    )
    tracking: TrackingConfig = TrackingConfig(experiment="mfr-ray-quickstart")

    def stage(self, stage: str, *extra: str):
        ref: StageConfig = getattr(self, stage)
        quick = self.quick_overrides.get(stage, []) if self.quick else []
        tracking = [f"tracking.experiment={self.tracking.experiment}"]
        if self.tracking.tracking_uri:
            tracking.append(f"tracking.tracking_uri={self.tracking.tracking_uri}")
        return load_config(ref.config, [*ref.overrides, *quick, *tracking, *extra])


def _timed(timings: dict[str, float], stage: str, fn, *args, **kwargs):
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    timings[stage] = round(time.perf_counter() - started, 1)
    print(f"[quickstart] {stage}: {timings[stage]:.0f}s", flush=True)
    return value


def comparison_rows(summaries: dict[str, dict], far_metric: str) -> list[dict]:
    """One row per (model, variant): accuracy and TPR at the FAR target, mean and std over the folds."""
    rows = []
    for model, summary in summaries.items():
        for row in summary["verification"]:
            rows.append(
                {
                    "model": model,
                    "variant": row["variant"],
                    "accuracy": row[metric_key("accuracy")],
                    "accuracy_std": row[metric_key("accuracy", stat="std")],
                    far_metric: row[metric_key(far_metric)],
                    metric_key(far_metric, stat="std"): row[metric_key(far_metric, stat="std")],
                }
            )
    return rows


def format_table(rows: list[dict], far_metric: str) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["variant"]): r for r in rows}
    lines = [
        "| model | " + " | ".join(f"{v} acc | {v} {far_metric}" for v in variants) + " |",
        "|---|" + "---|---|" * len(variants),
    ]
    for model in models:
        parts = []
        for v in variants:
            r = cell.get((model, v))
            parts += [
                f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}" if r else "-",
                f"{100 * r[far_metric]:.2f} +- {100 * r[f'{far_metric}_std']:.2f}" if r else "-",
            ]
        lines.append(f"| {model} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run every stage in order on the embedded default (or wherever the stage configs point)."""
    from mfr_ray.evaluation.runner import load_pairs

    root = join_uri(cfg.output_root, "quick") if cfg.quick else cfg.output_root
    timings: dict[str, float] = {}
    eval_cfg = cfg.stage("evaluate")
    check_headline_metric(cfg.headline_metric, eval_cfg.far_targets)
    train_data, eval_data = _prepare(cfg, root, "\n".join(load_pairs(eval_cfg).keys()).encode(), timings)
    models = _train(cfg, root, train_data, eval_cfg.model, timings)
    summaries: dict[str, dict] = {}
    for label, (model, parent) in models.items():
        stage_cfg = cfg.stage(
            "evaluate", *[f"sources.{v}.uri={eval_data}" for v in eval_cfg.sources],
            f"output_dir={join_uri(root, 'evaluation')}", f"name={cfg.name}-eval-{label.split()[0].lower()}",
        )
        stage_cfg.model, stage_cfg.parent_run_id = model, parent
        summaries[label] = _timed(timings, f"evaluate {label}", evaluate_stage, stage_cfg)
    rows = comparison_rows(summaries, cfg.headline_metric)
    served = best_network(rows, cfg.headline_variant, cfg.headline_metric)
    package = _timed(timings, "package", serve_package, cfg, root, *models[served])
    return _log_outcome(cfg, root, rows, timings) | {"package": package, "served": served}


def evaluate_stage(stage_cfg):
    from mfr_ray.evaluation.runner import evaluate

    return evaluate(stage_cfg)


def _prepare(cfg: QuickstartConfig, root: str, pair_keys: bytes, timings: dict) -> tuple[str, str]:
    """The training pairs and the LFW-SM variants; returns their URIs."""
    from mfr_ray.data import run_prepare

    train_data, eval_data = join_uri(root, "datasets", "celeba299"), join_uri(root, "datasets", "lfw-sm")
    keys_uri = join_uri(root, f"lfw_pair_keys-{hashlib.sha256(pair_keys).hexdigest()[:12]}.txt")  # content in the
    write_bytes(keys_uri, pair_keys)  # name: the prepared set's fingerprint then changes with the pair list
    for stage, extra in (
        ("prepare_train", [f"output.uri={train_data}"]),
        ("prepare_eval", [f"output.uri={eval_data}", f"index.include={keys_uri}"]),
    ):
        summary = _timed(timings, stage, run_prepare, cfg.stage(stage, *extra))
        if not summary.complete:
            raise RuntimeError(f"{stage} did not finish: {summary.problems}")
    return train_data, eval_data


def _train(cfg: QuickstartConfig, root: str, train_data: str, checkpoint, timings: dict) -> dict:
    """label -> (the model its training run describes, with that run's weights; the run id to nest under)."""
    from mfr_ray.models.weights import MODEL_FILE
    from mfr_ray.train import run_training

    models: dict[str, tuple[ModelSpec, str | None]] = {CHECKPOINT: (checkpoint.model_copy(update={"label": CHECKPOINT}), None)}
    for stage, label in TRAINED.items():
        train_cfg = cfg.stage(
            stage, f"data.uri={train_data}", f"checkpoint.storage_path={join_uri(root, 'train')}",
            f"name={cfg.name}-{stage}",
        )
        outcome = _timed(timings, stage, run_training, train_cfg, run_name=f"{cfg.name}-{stage}")
        weights = join_uri(outcome.result.checkpoint.path, MODEL_FILE)
        models[label] = (train_cfg.model.trained(weights, label), outcome.mlflow_run_id)
    return models


def best_network(rows: list[dict], variant: str, far_metric: str, max_unmasked_loss: float = 0.005) -> str:
    """The network to serve: the best masked figure among those that keep unmasked accuracy within
    `max_unmasked_loss` of the untouched checkpoint (the checkpoint itself if none does)."""
    cell = {(r["model"], r["variant"]): r for r in rows}
    floor = cell[(CHECKPOINT, "unmasked")]["accuracy"] - max_unmasked_loss
    kept = [m for m in dict.fromkeys(r["model"] for r in rows) if cell[(m, "unmasked")]["accuracy"] >= floor]
    return max(kept, key=lambda m: cell[(m, variant)][far_metric])


def serve_package(cfg: QuickstartConfig, root: str, model, parent: str | None) -> str:
    """Calibrate the served network on bare and masked photos aligned as deployed (the calibrate stage) and
    export it as a ready-to-serve package with a threshold per kind of comparison and, from never-enrolled
    CelebA-299 faces, per-search rates for identification."""
    from mfr_ray.serve.export import export_package

    calib = cfg.stage("calibrate", f"output_dir={join_uri(root, 'evaluation')}", f"name={cfg.name}-calibrate")
    calib.model, calib.parent_run_id = model, parent
    summary = evaluate_stage(calib)
    out = join_uri(root, "package")
    tracking = TrackingConfig(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment)
    export_package(summary["run_id"], out, fars=tuple(calib.far_targets), tracking=tracking)
    identities = min(cfg.search_calibration_identities, 12) if cfg.quick else cfg.search_calibration_identities
    if identities:
        from mfr_ray.paths import shared_dir
        from mfr_ray.serve.search_calibration import add_search_calibration

        add_search_calibration(out, shared_dir() / "datasets" / "celeba299", max_identities=identities)
    return out


def _log_outcome(cfg: QuickstartConfig, root: str, rows: list[dict], timings: dict) -> dict:
    """The comparison table and headline, in MLflow and beside the outputs."""
    import mlflow

    from mfr_ray.tracking import start_run

    table = format_table(rows, cfg.headline_metric)
    headline = headline_figures(rows, cfg.headline_variant, cfg.headline_metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with start_run(cfg.tracking, run_name=cfg.name) as run:
        mlflow.log_text(table, "comparison.md")
        mlflow.log_text(buffer.getvalue(), "comparison.csv")
        mlflow.log_dict(timings, "timings.json")
        mlflow.log_metrics(headline)
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "comparison.md").write_text(table + "\n")
    return {"table": table, "rows": rows, "headline": headline, "timings": timings, "run_id": run.info.run_id}


def check_headline_metric(metric: str, far_targets: list[float]) -> None:
    """Before any stage runs: the headline must be a metric the evaluate stage reports."""
    if metric not in (known := verification_metrics(far_targets)):
        raise ValueError(
            f"headline_metric {metric!r} is not reported by the evaluate stage (far_targets {far_targets}); "
            f"known: {', '.join(known)}"
        )


def headline_figures(rows: list[dict], variant: str, far_metric: str) -> dict[str, float]:
    """The claim in numbers (percentage points), for each pair of HEADLINE_PAIRS: the model's TPR gain on
    the headline variant over the reference, and its accuracy change on unmasked LFW."""
    cell = {(r["model"], r["variant"]): r for r in rows}
    figures = {}
    for model, reference, suffix in HEADLINE_PAIRS:
        gain = cell[(model, variant)][far_metric] - cell[(reference, variant)][far_metric]
        change = cell[(model, "unmasked")]["accuracy"] - cell[(reference, "unmasked")]["accuracy"]
        figures[f"{far_metric}_gain_{variant}{suffix}"] = 100 * gain
        figures[f"unmasked_accuracy_change{suffix}"] = 100 * change
    return figures


def print_outcome(cfg: QuickstartConfig, outcome: dict) -> None:
    from mfr_ray.config.secrets import redact
    from mfr_ray.tracking import resolve_tracking_uri

    print(outcome["table"])
    print("headline: " + ", ".join(f"{k}={v:+.2f} points" for k, v in outcome["headline"].items()))
    print("time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in outcome["timings"].items()))
    print(f"MLflow: run {outcome['run_id']} in {redact(resolve_tracking_uri(cfg.tracking))}; browse with `mfr ui`")
    package = outcome["package"]
    print(f"served network: {outcome['served']}, packaged in {package} (thresholds per kind of comparison: "
          f"{package}/MODEL_CARD.md). Enrol a folder of <person>/<photo> files, serve it, identify a photo:")
    fpir = " --fpir 0.01" if cfg.search_calibration_identities else ""
    print(f"  mfr enrol {package} PEOPLE_DIR --out galleries/site\n  mfr serve {package} --gallery galleries/site{fpir}\n"
          "  curl -s --data-binary @photo.jpg -H 'Content-Type: image/jpeg' localhost:8000/identify")
