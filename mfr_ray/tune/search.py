"""Ray Tune over training hyperparameters: every trial runs the Ray Train job of `mfr_ray.train` with the
sampled keys set, reports the validation objective each epoch, and is an MLflow run under the search's."""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mfr_ray.config import dump_config, flatten_config, set_dotted
from mfr_ray.config.loader import read_config_with_origins, validate_config
from mfr_ray.config.secrets import redact, safe_override, secret_fields, secret_paths
from mfr_ray.evaluation.metric_names import VAL_ACCURACY
from mfr_ray.raycluster import init_ray
from mfr_ray.storage import StorageError, filesystem_for, join_uri, read_bytes, write_bytes
from mfr_ray.tune.config import SearchDimension, TuneConfig

PARENT_RUN_FILE = "mlflow_parent_run.json"
BASE_DIGEST_PARAM = "base_config.sha256"
BASE_SPELLING_PARAMS = ("base_config", "base_overrides")
# Params that may differ when a search resumes: where it runs and the resume switch itself.
RESUME_FREE_PREFIXES = ("ray.", "resume")


class SearchChangedError(ValueError):
    """A search is resumed with another config than it was started with (Tune would ignore the change)."""


def param_domain(dim: SearchDimension, searcher: str):
    """The Tune sampling domain for one searched key."""
    from ray import tune

    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.type == "grid" and searcher in ("grid", "random"):
        return tune.grid_search(dim.values)
    return tune.choice(dim.values)


def base_train_dict(cfg: TuneConfig) -> dict[str, Any]:
    """The base training config as plain data, with the search's own overrides applied (what each trial sets
    its sampled keys on), read and checked as `load_config` does: a bad base fails by key and file."""
    from mfr_ray.train import TrainConfig

    data, origins = read_config_with_origins(cfg.base_config, cfg.base_overrides, overrides_origin="base_overrides")
    if data.get("kind") != "train":
        raise ValueError(f"{cfg.base_config}: base_config must be a train config (kind: train)")
    validate_config(data, cfg.base_config, expected=TrainConfig, origins=origins)  # names the file of its chain
    return data


def trial_train_data(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Base training config with a trial's sampled values set at their dotted keys."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key, value.item() if hasattr(value, "item") else value)
    return data


def trial_train_config(base: dict[str, Any], params: dict[str, Any]):
    """The validated TrainConfig of one trial (the base with the sampled values set)."""
    from mfr_ray.train import TrainConfig

    data = trial_train_data(base, params)
    data.pop("kind", None)
    return TrainConfig.model_validate(data)


def _storages(*configs: BaseModel) -> list:
    """Each config's storage section (None, the environment's credentials, for a config without one)."""
    return [getattr(config, "storage", None) for config in configs]


def search_params(cfg: TuneConfig, base_cfg) -> dict[str, str]:
    """The search config as the parent run's params: flattened, secrets out (also inside `base_overrides`),
    plus a digest of the base training config it expands to (a changed base file changes the search)."""
    secret_keys = secret_fields(type(base_cfg))
    overrides = [safe_override(item, secret_keys, *_storages(base_cfg, cfg)) for item in cfg.base_overrides]
    flat = flatten_config(cfg.model_copy(update={"base_overrides": overrides}))
    params = {k: redact("" if v is None else str(v), *_storages(base_cfg, cfg)) for k, v in flat.items()}
    base = json.dumps(dump_config(base_cfg), sort_keys=True, default=str)
    params[BASE_DIGEST_PARAM] = hashlib.sha256(base.encode()).hexdigest()[:16]
    return params


def changed_search_keys(started: dict[str, str], now: dict[str, str]) -> list[str]:
    """`key: old -> new` for every search setting that differs from what the search was started with."""

    def relevant(params: dict[str, str]) -> dict[str, str]:
        return {
            k: v for k, v in params.items() if not k.startswith(("best.", *RESUME_FREE_PREFIXES))
        }

    old, new = relevant(started), relevant(now)
    if BASE_DIGEST_PARAM not in old:  # a search started before the digest was recorded
        new.pop(BASE_DIGEST_PARAM, None)
    else:  # the digest is of the training config the base expands to; its spelling (a file with `base:`
        for spelling in BASE_SPELLING_PARAMS:  # or base_overrides) may change
            old.pop(spelling, None)
            new.pop(spelling, None)
    return [
        f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def shareable_train_yaml(data: dict[str, Any], *configs: BaseModel) -> str:
    """A train YAML without its secrets: `SecretStr` keys are left out (with a comment saying how to supply
    them) and any other occurrence of a credential (e.g. inside a URI) is redacted."""
    from mfr_ray.train import TrainConfig

    validated = TrainConfig.model_validate({k: v for k, v in data.items() if k != "kind"})
    clean = copy.deepcopy(data)
    left_out = []
    for key in secret_paths(validated):
        *parents, leaf = key.split(".")
        node = clean
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.pop(leaf, None) is not None:
            left_out.append(key)
    text = redact(yaml.safe_dump(clean, sort_keys=False), *_storages(validated, *configs))
    if not left_out:
        return text
    header = (
        f"# Secrets left out: {', '.join(left_out)}. Supply them from the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or as overrides, e.g.\n"
        f"#   mfr train best_train.yaml {left_out[0]}=...\n"
    )
    return header + text


def validate_search_space(cfg: TuneConfig, base: dict[str, Any]) -> None:
    """Fail before any trial starts if a searched key or value does not fit the training config."""
    for key, dim in cfg.search_space.items():
        samples = [dim.low, dim.high] if dim.values is None else dim.values
        for value in samples:
            try:
                trial_train_config(base, {key: value})
            except ValidationError as exc:
                raise ValueError(f"search_space.{key}={value!r} does not fit {cfg.base_config}: {exc}") from None


def _trial(
    params: dict[str, Any], *, base: dict[str, Any], search_name: str, parent_run_id: str | None, workdir: str
) -> None:
    """One Tune trial: a full Ray Train run whose per-epoch reports reach Tune. It runs in the search's
    working directory, so relative paths in the config (data, checkpoints, ./mlflow.db) mean what they
    mean to the user (Tune would otherwise start it in the trial's own folder)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mfr_ray.train import run_training

    os.chdir(workdir)
    train_cfg = trial_train_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    run_training(
        train_cfg,
        run_name=f"{search_name}-{trial_id}",
        extra_callbacks=[TuneReportCallback()],
        parent_run_id=parent_run_id,
    )


def _searcher(cfg: TuneConfig):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.searcher in ("grid", "random"):
        return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
    if cfg.searcher == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        algo = OptunaSearch(sampler=TPESampler(seed=cfg.seed))
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        algo = HyperOptSearch(random_state_seed=cfg.seed)
    return ConcurrencyLimiter(algo, max_concurrent=cfg.max_concurrent_trials)


def _scheduler(cfg: TuneConfig, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(max_epochs, cfg.scheduler.grace_period),
        grace_period=cfg.scheduler.grace_period,
        reduction_factor=cfg.scheduler.reduction_factor,
    )


def job_placement_groups(job_id: str) -> dict[str, dict[str, Any]]:
    """Placement groups created by the tasks and actors of one Ray job (hex id), by hex id: their state and
    bundles. The public `placement_group_table()` leaves out the creating job, which the GCS keeps."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import placement_group_table

    ours = set()
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if info.creator_job_id.hex() == job_id:
            ours.add(info.placement_group_id.hex())
    return {pg_id: info for pg_id, info in placement_group_table().items() if pg_id in ours}


def trial_placement_group_releaser(num_workers: int, bundle: dict[str, float]):
    """A Tune callback for searches that run one trial at a time. Ray Train V2 leaves a trial's worker
    placement group behind when Tune stops the trial (ASHA, max_t) instead of letting it return
    (ray-project/ray#54305), and the next trial's workers then wait for it forever. After each trial
    ends, this removes the placement groups shaped like our workers that this search's job created since
    the search began: never another job's on a shared cluster (the trials' Train controllers are actors
    of this driver's job)."""
    import ray
    from ray import PlacementGroupID, tune
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class ReleaseTrialPlacementGroups(tune.Callback):
        def __init__(self) -> None:
            self.job_id = ray.get_runtime_context().get_job_id()
            self.before_search = set(job_placement_groups(self.job_id))

        def release(self) -> None:
            for pg_id, info in job_placement_groups(self.job_id).items():
                bundles = list(info["bundles"].values())
                if (
                    pg_id not in self.before_search
                    and info["state"] == "CREATED"
                    and len(bundles) == num_workers
                    and all(b == bundle for b in bundles)
                ):
                    remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.release()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.release()

    return ReleaseTrialPlacementGroups()


@dataclass
class SearchResult:
    parent_run_id: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_config_path: str
    trials: list[dict[str, Any]]


def _parent_run_id(cfg: TuneConfig, experiment_uri: str) -> str | None:
    """The MLflow parent run of an earlier, interrupted search of the same name (for resume)."""
    marker = join_uri(experiment_uri, PARENT_RUN_FILE)
    try:
        return json.loads(read_bytes(marker, cfg.storage))["run_id"]
    except (StorageError, KeyError, ValueError):
        return None


def check_resumable(cfg: TuneConfig, parent_id: str, params: dict[str, str], state_uri: str) -> None:
    """Refuse to resume a search whose config changed since it started: Tune would continue the old
    search space, samples and scheduler and ignore the change, and MLflow refuses changed params."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mfr_ray.tracking import resolve_tracking_uri

    fresh = f"a new name (name={cfg.name}-2) or --restart (resume=false: a new search and MLflow parent run)"
    try:
        started = MlflowClient(resolve_tracking_uri(cfg.tracking)).get_run(parent_id).data.params
    except MlflowException:
        raise SearchChangedError(
            f"search {cfg.name!r} in {state_uri} was started under MLflow run {parent_id}, which the "
            f"tracking store {redact(resolve_tracking_uri(cfg.tracking), None)} does not have; to start it fresh "
            f"use {fresh}"
        ) from None
    changed = changed_search_keys(started, params)
    if changed:
        raise SearchChangedError(
            f"search {cfg.name!r} in {state_uri} was started with another config (MLflow parent run "
            f"{parent_id}); changed: {'; '.join(changed)}. Resuming would continue the old search and ignore "
            f"the change. Rerun with the original config to resume it, or start fresh with {fresh}."
        )


def trial_table(result_grid, keys: list[str], metric: str) -> list[dict[str, Any]]:
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        row = {"trial_id": metrics.get("trial_id", ""), "status": "error" if result.error else "ok"}
        row.update({key: (result.config or {}).get(key) for key in keys})
        row[metric] = metrics.get(metric)
        row[VAL_ACCURACY] = metrics.get(VAL_ACCURACY)
        row["epochs"] = metrics.get("training_iteration")
        rows.append(row)
    return rows


def plot_objective(rows: list[dict[str, Any]], keys: list[str], metric: str) -> bytes:
    """Scatter of the objective against each searched numeric key (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in keys if all(isinstance(r.get(k), int | float) for r in rows if r.get(k) is not None)]
    shown = numeric or keys
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5), squeeze=False)
    for ax, key in zip(axes[0], shown, strict=True):
        pts = [(r[key], r[metric]) for r in rows if r.get(metric) is not None and r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            labels = sorted({str(x) for x in xs}) if key not in numeric else None
            ax.scatter([labels.index(str(x)) for x in xs] if labels else xs, ys)
            if labels:
                ax.set_xticks(range(len(labels)), labels, rotation=30)
            elif "beta" in key or "lr" in key:
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run_search(cfg: TuneConfig) -> SearchResult:
    """Run (or resume) the search, log every trial under one MLflow parent run, write the best config."""
    from mfr_ray.tracking import log_config_params, start_run

    base = base_train_dict(cfg)
    base_cfg = trial_train_config(base, {})
    validate_search_space(cfg, base)
    init_ray(cfg.ray)

    storage = filesystem_for(cfg.storage_path, cfg.storage)
    experiment_uri = join_uri(cfg.storage_path, cfg.name)
    params = search_params(cfg, base_cfg)
    parent_id = _parent_run_id(cfg, experiment_uri) if cfg.resume else None
    if parent_id:
        check_resumable(cfg, parent_id, params, experiment_uri)

    with start_run(cfg.tracking, run_name=cfg.name, run_id=parent_id) as parent:
        if parent_id is None:  # a resumed search keeps the params it started with (checked equal above)
            log_config_params(params)
        parent_id = parent.info.run_id
        write_bytes(join_uri(experiment_uri, PARENT_RUN_FILE), json.dumps({"run_id": parent_id}).encode(), cfg.storage)
        grid = _tuner(cfg, base, base_cfg, parent_id, storage).fit()
        return _best_of(cfg, grid, base, parent_id)


def _tuner(cfg: TuneConfig, base: dict[str, Any], base_cfg, parent_id: str, storage: tuple):
    """The Tune run: restored from its folder when resuming one that exists, else a new one. `storage` is
    `filesystem_for`'s (filesystem, root) of the search's storage path."""
    from ray import tune

    fs, storage_root = storage
    trainable = tune.with_parameters(
        _trial, base=base, search_name=cfg.name, parent_run_id=parent_id, workdir=os.getcwd()
    )
    trainable = tune.with_resources(trainable, {"cpu": cfg.trial_cpus})
    on_s3 = cfg.storage_path.startswith("s3://")
    storage_path = storage_root if on_s3 else str(Path(storage_root))
    fs_arg = fs if on_s3 else None
    restore_path = f"{storage_path.rstrip('/')}/{cfg.name}"
    callbacks = []
    if cfg.max_concurrent_trials == 1:
        scaling = base_cfg.scaling
        bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": 1.0} if scaling.use_gpu else {})}
        callbacks.append(trial_placement_group_releaser(scaling.num_workers, bundle))
    if cfg.resume and tune.Tuner.can_restore(restore_path, storage_filesystem=fs_arg):
        print(f"resuming search {cfg.name} from {restore_path} (MLflow parent run {parent_id})", flush=True)
        return tune.Tuner.restore(restore_path, trainable, resume_errored=True, storage_filesystem=fs_arg)
    return tune.Tuner(
        trainable,
        param_space={key: param_domain(dim, cfg.searcher) for key, dim in cfg.search_space.items()},
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials,
            search_alg=_searcher(cfg),
            scheduler=_scheduler(cfg, base_cfg.schedule.epochs),
        ),
        run_config=tune.RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=fs_arg, callbacks=callbacks
        ),
    )


def _best_of(cfg: TuneConfig, grid, base: dict[str, Any], parent_id: str) -> SearchResult:
    """The best finished trial: its train config written (secrets out), the trial table, the objective plot
    and the best values logged to the parent run."""
    import mlflow
    from PIL import Image

    keys = list(cfg.search_space)
    rows = trial_table(grid, keys, cfg.metric)
    finished = [r for r in rows if r[cfg.metric] is not None]
    if not finished:
        raise RuntimeError(f"no trial of {cfg.name} reported {cfg.metric}; see the trial errors above")
    best = (max if cfg.mode == "max" else min)(finished, key=lambda r: r[cfg.metric])
    best_params = {key: best[key] for key in keys}
    best_yaml = shareable_train_yaml(trial_train_data(base, best_params), cfg)
    write_bytes(cfg.best_config_out, best_yaml.encode(), cfg.storage)

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    mlflow.log_text(table.getvalue(), "search/trials.csv")
    mlflow.log_text(best_yaml, "search/best_train.yaml")
    mlflow.log_image(Image.open(io.BytesIO(plot_objective(rows, keys, cfg.metric))), "search/objective.png")
    mlflow.log_metrics({f"best_{cfg.metric}": best[cfg.metric], "trials_finished": len(finished)})
    mlflow.log_params({f"best.{k}": v for k, v in best_params.items()})
    return SearchResult(parent_id, best_params, {cfg.metric: best[cfg.metric]}, cfg.best_config_out, rows)


def print_search(cfg: TuneConfig, result: SearchResult) -> None:
    for row in result.trials:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    print(f"best {cfg.metric}={result.best_metrics[cfg.metric]:.4f} with {result.best_params}")
    print(f"best config: {result.best_config_path}  (train it: mfr train {result.best_config_path})")
