"""The manifest row of one masked image and the result the engine returns. The Parquet schema is read off
the row's fields, so a new field is written once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np


@dataclass
class MaskRecord:
    """One manifest row. Geometry fields describe the largest face; `face_boxes` lists every face."""

    key: str
    status: str
    reason: str = ""
    num_faces: int = 0
    mask_type: str | None = None
    pattern: str | None = None
    color: str | None = None
    tilt_deg: float | None = None
    keypoints: list[list[float]] = field(default_factory=list)
    polygon: list[list[float]] = field(default_factory=list)
    template_view: str | None = None
    detector: str | None = None
    width: int = 0
    height: int = 0
    face_boxes: list[list[float]] = field(default_factory=list)
    style: str = ""  # JSON of the drawn style (MaskingConfig.style): discrete axes and continuous settings

    def to_row(self) -> dict:
        return asdict(self)


def record_schema():
    """pyarrow schema of `MaskRecord.to_row()`, so batches with and without faces concatenate."""
    import pyarrow as pa

    arrow_types = {
        "str": pa.string(),
        "int": pa.int64(),
        "float": pa.float64(),
        "list[list[float]]": pa.list_(pa.list_(pa.float64())),
    }
    return pa.schema([(f.name, arrow_types[f.type.removesuffix(" | None")]) for f in fields(MaskRecord)])


@dataclass
class MaskResult:
    """`image` is the masked RGB image (same size as the input) when status is ok, else None; `alpha`
    (uint8, HxW) is how much mask covers each pixel."""

    image: np.ndarray | None
    record: MaskRecord
    alpha: np.ndarray | None = None
