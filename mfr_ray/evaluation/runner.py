"""The evaluation job: crops -> embeddings per variant -> verification (+ extras) -> report + MLflow."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfr_ray.config.loader import dump_config
from mfr_ray.evaluation.analyses.base import AnalysisResult
from mfr_ray.evaluation.analyses.catalog import configured_analyses
from mfr_ray.evaluation.analyses.context import AnalysisContext, VariantData, pair_features
from mfr_ray.evaluation.config import EvaluateConfig, ImageSourceConfig, ProtocolSpec
from mfr_ray.evaluation.embed import EmbeddingSet, SharedEmbedder, embed_crops
from mfr_ray.evaluation.metric_names import far_tag, scoped
from mfr_ray.evaluation.report import (
    log_to_mlflow,
    markdown_report,
    plot_roc,
    write_csv,
    write_summary_json,
)
from mfr_ray.evaluation.sources import load_crops, source_fingerprint
from mfr_ray.evaluation.timing import EvaluationTimer
from mfr_ray.evaluation.verification import (
    PairList,
    auc,
    cosine_scores,
    equal_error_rate,
    kfold_verification,
    mean_subtracted_scores,
    read_pairs,
    roc_curve,
)
from mfr_ray.imageio import OK_FALLBACK, USABLE_STATUSES
from mfr_ray.raycluster import init_ray

TIMING_FILE = "timing.md"
CONFIG_FILE = "evaluate_config.json"  # the resolved config, secrets redacted (an MLflow artifact)


def load_pairs(cfg: EvaluateConfig) -> PairList:
    pairs = read_pairs(cfg.pairs.path, cfg.pairs.key_format, cfg.pairs.n_folds)
    if cfg.pairs.limit_folds:
        pairs = pairs.subset(pairs.fold < cfg.pairs.limit_folds)
    if cfg.pairs.max_pairs_per_fold:
        pairs = pairs.subset(pairs.first_per_fold(cfg.pairs.max_pairs_per_fold // 2))
    return pairs


def _cache_dir(cfg: EvaluateConfig) -> Path | None:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else None


@contextmanager
def stage_bar(desc: str, total: int, enabled: bool = True) -> Iterator:
    """A tqdm bar on stderr for one stage of one variant (images, with a rate). It redraws every second
    even while the stage reports nothing, so a long alignment never looks like a hang."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled, mininterval=1.0)
    stop = threading.Event()

    def redraw() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=redraw, daemon=True)
    ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        ticker.join()
        bar.close()


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's own bars off while our stage bars count the images (datasets copy the context)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = saved


def _quiet(cfg: EvaluateConfig):
    return _quiet_ray_data if cfg.compute.num_actors > 1 else nullcontext  # in-process: no Ray Data


def prepare_variants(cfg: EvaluateConfig, keys: list[str], progress: bool = True,
                     timer: EvaluationTimer | None = None) -> dict[str, VariantData]:
    """Crops and embeddings of every variant, a bar per stage; `timer` gets the stages `crops` and `embed`
    and the parts the workers report. One network serves every variant (`SharedEmbedder`)."""
    timer = timer or EvaluationTimer()
    shared, out = SharedEmbedder(), {}
    for variant, source in cfg.sources.items():
        if cfg.compute.torch_threads and source.align.num_threads is None:
            source = source.model_copy(
                update={"align": source.align.model_copy(update={"num_threads": cfg.compute.torch_threads})}
            )
        with stage_bar(f"align {variant}", len(keys), progress) as bar, _quiet(cfg)(), timer.stage("crops"):
            crops = load_crops(
                source, keys, _cache_dir(cfg), cfg.storage, cfg.compute.num_actors, cfg.compute.align_batch_size,
                progress=bar.update, timer=timer,
            )
            bar.update(len(keys) - bar.n)
        embeddings = embed_version(cfg, keys, variant, crops.crops, source, progress, timer, shared)
        out[variant] = VariantData(crops, embeddings, source)
    return out


def embed_version(cfg: EvaluateConfig, keys: list[str], name: str, crops: np.ndarray, source: ImageSourceConfig,
                  progress: bool = True, timer: EvaluationTimer | None = None,
                  shared: SharedEmbedder | None = None) -> EmbeddingSet:
    """Embeddings of one version `name` of a source's crops (the variant itself, or an analysis's altered
    copy), cached by weights, source, flip, precision, runtime and name."""
    cache = _cache_dir(cfg)
    timer = timer or EvaluationTimer()
    tag = (
        f"{cfg.model.fingerprint(cfg.storage)}-{source_fingerprint(source, keys)}-{int(cfg.flip)}"
        f"{'-bf16' if cfg.compute.bf16 else ''}-{cfg.compute.runtime}-{name}"
    )
    with stage_bar(f"embed {name}", len(keys), progress) as bar, _quiet(cfg)(), timer.stage("embed"):
        embeddings = embed_crops(
            keys, crops, cfg.model, cfg.flip,
            cache_path=cache / f"emb-{tag}.npz" if cache else None,
            num_actors=cfg.compute.num_actors, batch_size=cfg.compute.embed_batch_size,
            num_threads=cfg.compute.torch_threads, bf16=cfg.compute.bf16, progress=bar.update,
            storage=cfg.storage, runtime=cfg.compute.runtime, timer=timer, shared=shared,
        )
        bar.update(len(keys) - bar.n)  # from the cache: all at once
    return embeddings



def protocol_scores(left, right, pairs: PairList, protocol: ProtocolSpec) -> np.ndarray:
    if protocol.subtract_train_mean:
        return mean_subtracted_scores(left, right, pairs.fold)
    return cosine_scores(left, right)


def pooled_test_scores(scores: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Each pair's score as seen when its own fold was the test fold (for ROC/EER of fitted protocols)."""
    if scores.ndim == 1:
        return scores
    rows = np.searchsorted(np.unique(fold), fold)
    return scores[rows, np.arange(scores.shape[1])]


def _verification_row(protocol, variant, result, scores, pairs, far_targets):
    pooled = pooled_test_scores(scores, pairs.fold)
    far, tpr, _ = roc_curve(pooled, pairs.same)
    row = {"protocol": protocol, "variant": variant} | result.summary().as_dict()
    row |= {"eer": equal_error_rate(far, tpr), "auc": auc(far, tpr), "tags": {str(t): far_tag(t) for t in far_targets}}
    return row, (far, tpr)


@dataclass
class Verification:
    """The k-fold verification of every protocol x variant: report rows, ROC curves, MLflow metrics
    (`<protocol>.<variant>.<metric>`) and the reference variant's per-fold table."""

    rows: list[dict]
    curves: dict[str, tuple]
    metrics: dict[str, float]
    fold_table: list[dict] | None


def verify_variants(cfg: EvaluateConfig, pairs: PairList, data: dict[str, VariantData],
                    primary: str | None = None) -> Verification:
    """Every protocol on every variant of `data`; the per-fold table is `primary`'s under the first protocol."""
    found = Verification([], {}, {}, None)
    for protocol in cfg.protocols:
        for variant, variant_data in data.items():
            left, right = pair_features(variant_data, pairs, protocol)
            scores = protocol_scores(left, right, pairs, protocol)
            result = kfold_verification(scores, pairs.same, pairs.fold, cfg.far_targets)
            row, curve = _verification_row(protocol.name, variant, result, scores, pairs, cfg.far_targets)
            found.rows.append(row)
            found.curves[f"{protocol.name} / {variant}"] = curve
            found.metrics |= {scoped(protocol.name, variant, k): v for k, v in row.items() if isinstance(v, float)}
            if found.fold_table is None and variant == primary:
                found.fold_table = result.fold_table()
    return found


def _far_notes(pairs: PairList, far_targets: list[float]) -> list[str]:
    """A note per FAR target a test fold is too small to reach; the threshold's folds are counted, not
    assumed (LFW has 10, `pairs.limit_folds` / `n_folds` can leave 2: one training fold)."""
    folds = np.unique(pairs.fold)
    per_fold = int((~pairs.same[pairs.fold == folds[0]]).sum())
    n_train = len(folds) - 1
    train_impostors = int((~pairs.same[pairs.fold != folds[0]]).sum())
    training_folds = f"{n_train} training fold{'' if n_train == 1 else 's'}"
    notes = []
    for target in far_targets:
        allowed = target * per_fold
        if allowed < 1:
            notes.append(
                f"FAR={target:g} with {per_fold} impostor pairs per test fold is {allowed:.2f} false accepts: "
                f"a test fold can only reach FAR 0 or >= {1 / per_fold:.4f}, so the per-fold 'FAR reached' is "
                f"coarse and the threshold is set on the {training_folds} ({train_impostors} impostors, "
                f"{int(target * train_impostors + 1e-9)} false accepts allowed)."
            )
    return notes


def run_analyses(ctx: AnalysisContext) -> dict[str, AnalysisResult]:
    """Every registered analysis the config switches on, in report order (mfr_ray/evaluation/analyses/)."""
    out = {}
    for analysis in configured_analyses(ctx.cfg.analyses):
        if analysis.enabled and (result := analysis.run(ctx)) is not None:
            out[analysis.name] = result
    return out


def evaluate(cfg: EvaluateConfig, output_dir: Path | None = None, progress: bool = True) -> dict:
    """Run the whole evaluation; returns the summary dict (also written as summary.json/report.md). The
    MLflow run opens first, so it shows as running while the work runs and ends with its real duration
    (failed, if the evaluation raises). The seconds per stage end as `timing.md` and `timing/*` metrics."""
    output_dir = Path(output_dir or Path(cfg.output_dir) / cfg.name)
    timer = EvaluationTimer()
    with _evaluation_run(cfg, timer) as run:
        summary = _run_evaluation(cfg, output_dir, progress, timer)
        if run is not None:
            with timer.stage("mlflow"):
                log_to_mlflow(summary["metrics"], output_dir)
            summary["run_id"] = run.info.run_id
        _record_timing(timer, output_dir, run is not None, progress)
    return summary


@contextmanager
def _evaluation_run(cfg: EvaluateConfig, timer: EvaluationTimer) -> Iterator:
    if not cfg.tracking.enabled:
        yield None
        return
    from mfr_ray.tracking import log_config_params, start_run

    with ExitStack() as stack:
        with timer.stage("mlflow"):
            run = stack.enter_context(start_run(
                cfg.tracking, run_name=cfg.name, parent_run_id=cfg.parent_run_id,
                tags={"mfr.stage": "evaluate", "mfr.model": cfg.model.display_name()}))
            log_config_params(cfg)
        yield run


def _record_timing(timer: EvaluationTimer, output_dir: Path, tracked: bool, show: bool) -> None:
    """`timing.md` beside the report, on the console when bars are, and in the MLflow run: what the time
    of this evaluation went to (MLflow's own share counts everything logged before this)."""
    table = timer.table()
    (output_dir / TIMING_FILE).write_text(table + "\n")
    if show:
        print(f"\nwhere the time went ({TIMING_FILE}):\n{table}", file=sys.stderr, flush=True)
    if tracked:
        import mlflow

        mlflow.log_metrics(timer.metrics())
        mlflow.log_artifact(str(output_dir / TIMING_FILE))


def _run_evaluation(cfg: EvaluateConfig, output_dir: Path, progress: bool, timer: EvaluationTimer) -> dict:
    started = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(json.dumps(dump_config(cfg), indent=2))  # what `mfr export` rebuilds
    pairs = load_pairs(cfg)
    keys = pairs.keys()
    if cfg.compute.num_actors > 1:
        with timer.stage("ray start"):
            init_ray(cfg.ray)
    data = prepare_variants(cfg, keys, progress, timer)
    primary = cfg.primary_variant()
    with timer.stage("scoring"):
        found = verify_variants(cfg, pairs, data, primary)
    rows, curves, metrics, fold_table = found.rows, found.curves, found.metrics, found.fold_table
    with timer.stage("report"):
        write_csv(output_dir / "folds.csv", fold_table)
        plot_roc(output_dir / "roc.png", curves, cfg.far_targets)
    summary = {
        "name": cfg.name, "model": cfg.model.display_name(), "pairs_file": cfg.pairs.path,
        "n_pairs": len(pairs), "n_folds": pairs.n_folds, "official_folds": pairs.has_official_folds,
        "n_images": len(keys), "far_targets": cfg.far_targets, "verification": rows,
        "fold_table": fold_table, "far_notes": _far_notes(pairs, cfg.far_targets),
        "alignment": _alignment_summary(data), "notes": [],
    }
    with timer.stage("analyses"):
        context = AnalysisContext(cfg, pairs, data, primary, output_dir, progress, embed_version)
        for name, result in run_analyses(context).items():
            summary[name] = result.section
            metrics |= result.metrics
    with timer.stage("report"):
        data[primary].embeddings.save(output_dir / "embeddings.npz")
        _save_kind_scores(cfg, pairs, data, primary, output_dir)
        summary["seconds"] = round(time.time() - started, 1)
        write_summary_json(output_dir / "summary.json", summary)
        (output_dir / "report.md").write_text(markdown_report(summary))
    summary["metrics"] = metrics
    return summary


def _save_kind_scores(cfg: EvaluateConfig, pairs: PairList, data: dict[str, VariantData], primary: str,
                      output_dir: Path) -> None:
    """`pair_scores.npz`: bare, masked-bare and masked-masked pair scores with the protocol a package scores
    with (what `mfr export` calibrates a threshold per kind of comparison on)."""
    from mfr_ray.evaluation.comparison_kinds import PAIR_SCORES_FILE, kind_scores, plain_protocol

    protocol = plain_protocol(cfg.protocols)
    if protocol is None:
        return
    features = {v: d.embeddings.features(protocol.feature) for v, d in data.items()}
    kind_scores(features, data[primary].embeddings.keys, pairs, primary).save(output_dir / PAIR_SCORES_FILE)


def _alignment_summary(data: dict[str, VariantData]) -> str:
    parts = []
    for variant, d in data.items():
        methods, counts = np.unique(d.crops.method, return_counts=True)
        failed = int((~np.isin(d.crops.status, list(USABLE_STATUSES))).sum())
        fallback = int((d.crops.status == OK_FALLBACK).sum())
        unmasked = int((np.char.find(d.crops.reason.astype(str), "mask not applied") >= 0).sum())
        parts.append(f"{variant}: " + ", ".join(f"{m or 'none'} {c}" for m, c in zip(methods, counts))
                     + (f", {failed} failed (black crop)" if failed else "")
                     + (f", {fallback} {OK_FALLBACK} (centre box guessed)" if fallback else "")
                     + (f", {unmasked} left unmasked (no landmarks for the mask)" if unmasked else ""))
    return "; ".join(parts)
