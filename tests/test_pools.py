"""Actor pools with bounded retries on a real local Ray: an input that kills its worker process every time
becomes a row (inputs in = rows out) instead of an endless retry, and every other input is answered."""

from __future__ import annotations

import numpy as np
import pytest

from mfr_ray.pools import run_on_actors

pytestmark = pytest.mark.slow  # actor restarts and one task per left-over input: ~30-60 s


def test_an_input_that_kills_its_worker_becomes_a_row(ray_local):
    class PoisonSensitive:
        """Dies (the whole process, as a segfaulting decoder would) on the key "poison"."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            import os

            if "poison" in [str(k) for k in batch["key"]]:
                os._exit(1)
            return {"key": batch["key"], "status": np.array(["ok"] * len(batch["key"]))}

    keys = [f"img-{i}" for i in range(6)] + ["poison"] + [f"img-{i}" for i in range(6, 12)]

    def crashed(item, reason):
        return {"key": np.array([item["key"]]), "status": np.array([f"crashed: {reason}"])}

    rows = {}
    for part in run_on_actors([{"key": k} for k in keys], PoisonSensitive, constructor_kwargs={}, key="key",
                              batch_size=4, num_actors=1, on_crash=crashed, max_restarts=1, num_cpus=0.5):
        for key, status in zip(part["key"], part["status"], strict=True):
            assert str(key) not in rows, f"{key} answered twice"
            rows[str(key)] = str(status)
    assert sorted(rows) == sorted(keys)  # inputs in = rows out
    assert rows["poison"].startswith("crashed") and "worker" in rows["poison"]
    assert {rows[k] for k in keys if k != "poison"} == {"ok"}
