"""The composed job: index -> (align -> mask -> write on Ray Data actors) -> card, check, summary, MLflow.

Resumable and idempotent: finished shards (marker present, file footers readable and row counts
matching) are skipped, so a rerun after a crash does only the rest (and redoes a shard whose file a power
loss truncated) and a rerun of a finished job writes nothing. One run at a time writes an output: it
holds the output's lock.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

from mfr_ray.data.card import aggregate_markers, build_card, card_markdown, check_complete, write_card
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.index import DatasetIndex, IndexMismatch, index_images, load_index
from mfr_ray.data.layout import (
    CARD_JSON,
    LABEL_MAP,
    TMP_DIR,
    DatasetLayout,
    OutputLocked,
    StorageUnavailable,
    output_lock,
)
from mfr_ray.data.process import STAGES, ShardProcessor
from mfr_ray.imageio import UNMASKED
from mfr_ray.raycluster import init_ray
from mfr_ray.storage import StorageError, ensure_bucket


class PrepareFailed(RuntimeError):
    """The job stopped early; finished shards are kept and rerunning the same config continues."""


@dataclass
class PrepareSummary:
    output_uri: str
    num_images: int
    processed_images: int
    processed_shards: int
    skipped_shards: int
    elapsed_s: float
    status_counts: dict[str, dict[str, int]]
    problems: list[str] = field(default_factory=list)
    run_id: str | None = None
    card: dict | None = None

    @property
    def images_per_s(self) -> float:
        return self.processed_images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def complete(self) -> bool:
        return not self.problems


def finished_marker(layout: DatasetLayout, index: DatasetIndex, shard_id: int, variants: list[str]) -> dict | None:
    """The shard's marker if the shard is complete: marker present, input count and file rows matching."""
    try:
        marker = layout.read_json(layout.done_path(shard_id))
    except ValueError:  # a torn marker: the shard is redone
        return None
    if marker is None or marker.get("inputs") != index.shard_sizes[shard_id]:
        return None
    for variant in variants:
        if layout.parquet_rows(layout.data_path(variant, shard_id)) != marker["files"].get(variant):
            return None
    return marker


def run_shards(cfg: PrepareConfig, index: DatasetIndex, pending: list[int], progress: bool) -> Iterator[dict]:
    """Process the pending shards on an actor pool; yields each shard's marker as it finishes."""
    import ray
    from tqdm import tqdm

    init_ray(cfg.ray)
    shards = ray.data.from_items([{"shard_id": s} for s in pending], override_num_blocks=len(pending))
    shards.context.wait_for_min_actors_s = cfg.compute.wait_for_actors_s  # this dataset's own copy
    shards.context.enable_progress_bars = False  # the bar below counts images; Ray Data's would count shards
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for these actor options yet, only the deprecated extra kwargs
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        results = shards.map_batches(
            ShardProcessor,
            fn_constructor_kwargs={"config": cfg, "identities": index.identities},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.compute.num_actors),
            num_cpus=cfg.compute.cpus_per_actor,
            # bounded, not Ray Data's forever: a shard whose image kills the actor gets this many retries,
            # enough for ShardProcessor to write that image off as `crashed` (compute.max_image_attempts)
            max_restarts=cfg.compute.max_actor_restarts,
            max_task_retries=cfg.compute.max_actor_restarts,
        )
    total = sum(index.shard_sizes[s] for s in pending)
    done = 0
    with tqdm(total=total, unit="img", desc=f"prepare {cfg.name}", disable=not progress, file=sys.stderr) as bar:
        try:
            for row in results.iter_rows():
                marker = json.loads(row["marker"])
                done += 1
                bar.update(marker["inputs"])
                yield marker
        except Exception as exc:
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise PrepareFailed(
                f"prepare stopped after {done}/{len(pending)} pending shards: {cause}. "
                "Finished shards are kept; rerun the same command to continue."
            ) from exc


def run_prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareSummary:
    """Run (or resume) the whole job and return what it did; prints the summary table."""
    started = time.perf_counter()
    ensure_bucket(cfg.output.uri, cfg.storage)
    layout = DatasetLayout(cfg.output.uri, cfg.storage, cfg.compute.io_retry_s)
    with output_lock(layout, force=cfg.output.force_unlock):
        return _run_locked(cfg, layout, started, progress)


def _run_locked(cfg: PrepareConfig, layout: DatasetLayout, started: float, progress: bool) -> PrepareSummary:
    index = load_index(cfg, layout) or index_images(cfg, layout)
    variants = [UNMASKED] + [v.name for v in cfg.variants]
    markers: dict[int, dict] = {}
    pending = []
    for shard_id in index.shard_ids:
        marker = finished_marker(layout, index, shard_id, variants)
        if marker is None:
            pending.append(shard_id)
        else:
            markers[shard_id] = marker
    skipped = len(markers)
    if pending:
        layout.delete(TMP_DIR)  # staging files of a killed run
        for marker in run_shards(cfg, index, pending, progress):
            markers[marker["shard_id"]] = marker
    totals = aggregate_markers(list(markers.values()))
    summary = PrepareSummary(
        output_uri=cfg.output.uri,
        num_images=index.num_images,
        processed_images=sum(index.shard_sizes[s] for s in pending),
        processed_shards=len(pending),
        skipped_shards=skipped,
        elapsed_s=time.perf_counter() - started,
        status_counts=totals["status"],
        problems=check_complete(index, totals),
    )
    if pending or layout.read_json(layout.path(CARD_JSON)) is None:
        summary.card = build_card(cfg, index, totals)
        summary.card["last_run"] = {
            "processed_images": summary.processed_images,
            "elapsed_s": round(summary.elapsed_s, 2),
            "images_per_s": round(summary.images_per_s, 3),
        }
        write_card(layout, summary.card)
        if cfg.tracking.enabled:
            summary.run_id = log_dataset_run(cfg, layout, summary)
    print(summary_table(summary, totals), flush=True)
    return summary


def log_dataset_run(cfg: PrepareConfig, layout: DatasetLayout, summary: PrepareSummary) -> str:
    """One MLflow run per job execution that wrote something: config, counts, throughput, card, label map."""
    import mlflow

    from mfr_ray.tracking import log_config_params, start_run

    tags = {"mfr.stage": "prepare", "mfr.run_type": "dataset", "mfr.dataset_uri": cfg.output.uri}
    with start_run(cfg.tracking, run_name=f"prepare-{cfg.name}", tags=tags) as run:
        log_config_params(cfg)
        metrics = {
            "num_images": summary.num_images,
            "processed_images": summary.processed_images,
            "images_per_s": summary.images_per_s,
            "elapsed_s": summary.elapsed_s,
            "complete": float(summary.complete),
        }
        for variant, by_status in summary.status_counts.items():
            metrics.update({f"rows.{variant}.{status}": n for status, n in by_status.items()})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(summary.card, "dataset_card.json")
        mlflow.log_text(card_markdown(summary.card), "dataset_card.md")
        mlflow.log_dict(layout.read_json(layout.path(LABEL_MAP)), "label_map.json")
        mlflow.log_input(dataset_entity(cfg, summary.card["fingerprint"]), context="prepared")
        return run.info.run_id


def dataset_entity(cfg: PrepareConfig, fingerprint: str):
    """The output as an MLflow dataset (name, source URI, content fingerprint), shown in the run's inputs."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(cfg.output.uri)
    return MetaDataset(source=source, name=cfg.name, digest=fingerprint)


def summary_table(summary: PrepareSummary, totals: dict) -> str:
    """Final report: throughput, rows per variant and status, the images-in = rows-out check, stage times."""
    statuses = sorted({s for counts in summary.status_counts.values() for s in counts})
    width = max([len(v) for v in summary.status_counts] + [8])
    lines = [
        (
            f"prepared {summary.output_uri}: {summary.num_images} images; this run {summary.processed_images} "
            f"images in {summary.processed_shards} shards ({summary.skipped_shards} shards already done), "
            f"{summary.elapsed_s:.1f} s, {summary.images_per_s:.2f} images/s"
        ),
        f"{'variant':<{width}} {'rows':>8} " + " ".join(f"{s:>12}" for s in statuses),
    ]
    for variant in sorted(summary.status_counts, key=lambda name: (name != UNMASKED, name)):
        counts = summary.status_counts[variant]
        rows = sum(counts.values())
        lines.append(f"{variant:<{width}} {rows:>8} " + " ".join(f"{counts.get(s, 0):>12}" for s in statuses))
    unmasked = summary.status_counts.get(UNMASKED, {})
    ok, fallback = unmasked.get("ok", 0), unmasked.get("ok_fallback", 0)
    lines.append(
        f"check: images in {summary.num_images} = unmasked rows out {sum(unmasked.values())} "
        f"(ok {ok} + ok_fallback {fallback} + failed {sum(unmasked.values()) - ok - fallback}): "
        + ("OK" if summary.complete else "MISMATCH: " + "; ".join(summary.problems))
    )
    seconds = totals["stage_seconds"]
    spent = sum(seconds.get(s, 0.0) for s in STAGES) or 1.0
    lines.append(
        "actor time per stage (all shards): "
        + ", ".join(f"{s} {seconds.get(s, 0.0):.1f}s ({100 * seconds.get(s, 0.0) / spent:.0f}%)" for s in STAGES)
    )
    lines.append(f"shards per node: {totals['shards_per_node']}")
    return "\n".join(lines)


def prepare_and_report(cfg: PrepareConfig, progress: bool = True) -> int:
    """Exit status for the command-line forms: 0 when complete, 1 with a one-paragraph reason otherwise."""
    try:
        summary = run_prepare(cfg, progress)
    except (
        PrepareFailed, IndexMismatch, OutputLocked, StorageUnavailable, StorageError, FileNotFoundError
    ) as exc:
        print(f"prepare failed: {exc}", file=sys.stderr, flush=True)
        return 1
    if not summary.complete:
        print(f"prepare incomplete: {'; '.join(summary.problems)}", file=sys.stderr, flush=True)
        return 1
    return 0
