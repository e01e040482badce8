"""Work over Ray Data actor pools whose retries are bounded, and where an input that kills its worker
becomes a row instead of an endless retry.

Ray Data restarts a dead actor and retries its batch forever by default; one image that crashes the
decoder or the detector would hang the job. Here an actor is restarted and a batch retried
`max_restarts` times; when the pool still fails, the inputs it had not answered are run one per Ray task
without retries, so the input that kills its task is answered by `on_crash(item, reason)` and every
other input as usual: inputs in = rows out."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Batch = dict[str, np.ndarray]
DEFAULT_MAX_RESTARTS = 2


def bounded_actor_options(max_restarts: int = DEFAULT_MAX_RESTARTS) -> dict[str, int]:
    """`map_batches` options that bound an actor pool's restarts and retries (Ray's default is forever)."""
    return {"max_restarts": max_restarts, "max_task_retries": max_restarts}


def map_batches_bounded(ds, udf, *, constructor_kwargs: dict, batch_size: int, num_actors: int,
                        num_cpus: float | None = None, max_restarts: int = DEFAULT_MAX_RESTARTS, **options):
    """`ds.map_batches(udf, **options)` on a pool of `num_actors` actors with bounded restarts (lazy, like
    Ray Data)."""
    import ray

    if num_cpus is not None:
        options["num_cpus"] = num_cpus
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for these actor options yet, only the deprecated extra kwargs
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(udf, fn_constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                              compute=ray.data.ActorPoolStrategy(size=num_actors),
                              **bounded_actor_options(max_restarts), **options)


def run_on_actors(items: list[dict[str, Any]], udf, *, constructor_kwargs: dict, key: str, batch_size: int,
                  num_actors: int, on_crash: Callable[[dict[str, Any], str], Batch],
                  num_cpus: float | None = None, max_restarts: int = DEFAULT_MAX_RESTARTS) -> Iterator[Batch]:
    """Yield `udf`'s output batches for `items` (each batch carries column `key`); inputs left when the
    pool gives up are run alone, and the one that kills its task yields `on_crash(item, reason)`."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), num_actors * 4)))
    ds = map_batches_bounded(ds, udf, constructor_kwargs=constructor_kwargs, batch_size=batch_size,
                             num_actors=num_actors, num_cpus=num_cpus, max_restarts=max_restarts)
    ds.context.enable_progress_bars = False  # callers count inputs with their own bar
    answered: set[str] = set()
    try:
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            answered.update(str(k) for k in part[key])
            yield part
    except Exception as exc:  # noqa: BLE001 - the pool gave up after its bounded retries: isolate the culprit
        left = [item for item in items if str(item[key]) not in answered]
        print(f"warning: the actor pool stopped ({type(exc).__name__}); running the {len(left)} inputs it "
              "had not answered one at a time", file=sys.stderr, flush=True)
        yield from _one_at_a_time(left, udf, constructor_kwargs, on_crash, num_cpus, num_actors)


def _run_one(udf, constructor_kwargs: dict, item: dict[str, Any]) -> Batch:
    return udf(**constructor_kwargs)({name: np.array([value]) for name, value in item.items()})


def _one_at_a_time(items, udf, constructor_kwargs, on_crash, num_cpus, parallel: int) -> Iterator[Batch]:
    """Each input in its own task (no retry), `parallel` at a time; a task that dies or raises answers
    `on_crash` for its input."""
    import ray

    task = ray.remote(num_cpus=1 if num_cpus is None else num_cpus, max_retries=0)(_run_one)
    pending: dict = {}
    queue = list(items)
    while queue or pending:
        while queue and len(pending) < max(1, parallel):
            item = queue.pop(0)
            pending[task.remote(udf, constructor_kwargs, item)] = item
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        item = pending.pop(ready)
        try:
            yield ray.get(ready)
        except Exception as exc:  # noqa: BLE001 - a crash (worker died) or an error: its row says so
            yield on_crash(item, f"crashed its worker: {type(exc).__name__}")


def run_batches(items: list[dict[str, Any]], udf, *, constructor_kwargs: dict, key: str, batch_size: int,
                num_actors: int, on_crash: Callable[[dict[str, Any], str], Batch], local: Callable | None = None,
                num_cpus: float | None = None) -> Iterator[Batch]:
    """`udf`'s output batches for `items`: here, by one `udf` (made by `local()`, e.g. one kept for reuse, or
    built from `constructor_kwargs`), when one actor is asked for or the inputs fit one batch - a pool would
    only cost its start-up -, else on a bounded actor pool (`run_on_actors`). The one "in process or on
    actors" choice of evaluation's cropping and embedding."""
    if num_actors <= 1 or len(items) <= batch_size:
        worker = local() if local is not None else udf(**constructor_kwargs)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield worker({name: np.array([item[name] for item in chunk]) for name in chunk[0]})
        return
    yield from run_on_actors(items, udf, constructor_kwargs=constructor_kwargs, key=key, batch_size=batch_size,
                             num_actors=num_actors, on_crash=on_crash, num_cpus=num_cpus)
