"""Data preparation: index -> align -> mask -> write on Ray Data, and readers of the prepared datasets.

`run_prepare(PrepareConfig)` runs the job; `read_prepared` / `paired_dataset` read its output.
The job pieces load lazily so importing the readers does not pull in torch, dlib or the mask engine.
"""

from mfr_ray import lazy_attributes
from mfr_ray.data.reader import (
    IncompleteDataset,
    load_label_map,
    paired_dataset,
    prepared_variants,
    read_prepared,
    read_variant_table,
    require_complete,
)

_LAZY = {
    "PrepareConfig": "mfr_ray.data.config",
    "PrepareSummary": "mfr_ray.data.job",
    "run_prepare": "mfr_ray.data.job",
}

__all__ = [
    "IncompleteDataset", "PrepareConfig", "PrepareSummary", "load_label_map", "paired_dataset",
    "prepared_variants", "read_prepared", "read_variant_table", "require_complete", "run_prepare",
]

__getattr__ = lazy_attributes(__name__, _LAZY)
