"""Config of a dataset-preparation job (`kind: prepare`): where images come from, how they are aligned
and masked, what is written, and how many Ray actors do the work."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, model_validator

from mfr_ray.config.base import SharedPath, StrictModel
from mfr_ray.config.common import RayConfig, StorageConfig, TrackingConfig
from mfr_ray.config.loader import dump_config
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import IMAGE_SUFFIXES
from mfr_ray.masking.config import MaskingConfig


class IndexConfig(StrictModel):
    """The input tree `<uri>/<identity>/<image>`: identity = first folder below the root."""

    uri: SharedPath = Field(..., description="local folder, file:// or s3://bucket/prefix")
    suffixes: list[str] = Field(default_factory=lambda: list(IMAGE_SUFFIXES))
    limit: int | None = Field(None, ge=1, description="keep only the first N images of the listing")
    include: SharedPath | None = Field(
        None, description="text file of keys (one `<identity>/<file>` per line): index only these, e.g. the "
        "images an evaluation's pair list references"
    )
    shard_size: int = Field(128, ge=1, le=100_000, description="images per output shard (the unit of resume)")
    max_file_bytes: int = Field(
        64 * 2**20, ge=1, description="larger files are never read into memory: they become a too_large row"
    )



class VariantConfig(StrictModel):
    """One family of masked copies: `copies` masked versions of every aligned crop, labelled `name`."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="value of the `variant` column and folder")
    mask_type: str | None = Field(None, description="fixed mask type; None draws from masking.mix")
    copies: int = Field(1, ge=1, le=32)


class OutputConfig(StrictModel):
    uri: SharedPath = Field(..., description="local folder, file:// or s3://bucket/prefix")
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(95, ge=1, le=100)
    force_unlock: bool = Field(
        False, description="take over the output's _lock.json even if another run holds it (that run must "
        "be dead: two runs into one output delete each other's staging)"
    )


class PrepareComputeConfig(StrictModel):
    num_actors: int = Field(2, ge=1, description="Ray Data actors, each with its own aligner and mask engine")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs each actor asks Ray for; its torch and OpenCV threads are the whole CPUs "
        "of it (at least 1) unless align.num_threads says otherwise"
    )
    io_retry_s: float = Field(120.0, ge=0, description="how long a shard keeps retrying unreachable storage")
    wait_for_actors_s: int = Field(
        600, description="wait for the whole pool before dispatching, so every node gets work (<= 0: don't)"
    )
    max_image_attempts: int = Field(
        2, ge=1, description="an image in progress when its actor died this many times becomes a `crashed` "
        "row and the shard completes without it"
    )
    max_actor_restarts: int = Field(
        4, ge=0, description="times Ray restarts a dead prepare actor and retries its shard (Ray Data's "
        "default is forever, so a poison input would loop); must allow max_image_attempts deaths"
    )

    @model_validator(mode="after")
    def _restarts_cover_attempts(self) -> PrepareComputeConfig:
        if self.max_actor_restarts < self.max_image_attempts:
            raise ValueError(
                f"max_actor_restarts ({self.max_actor_restarts}) must be >= max_image_attempts "
                f"({self.max_image_attempts}): the actor has to survive the deaths that mark an image crashed"
            )
        return self


class PrepareConfig(StrictModel):
    """Index -> align -> mask -> write, resumable shard by shard."""

    name: str = "prepare"
    index: IndexConfig
    align: AlignConfig = AlignConfig()
    masking: MaskingConfig = MaskingConfig()
    variants: list[VariantConfig] = Field(default_factory=lambda: [VariantConfig(name="masked")])
    output: OutputConfig
    compute: PrepareComputeConfig = PrepareComputeConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _distinct_variants(self) -> PrepareConfig:
        names = [v.name for v in self.variants]
        if "unmasked" in names or len(set(names)) != len(names):
            raise ValueError(f"variant names must be distinct and not 'unmasked' (got {names})")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that decides the content of the output, so a rerun into the same output
        with different settings is refused instead of mixing two datasets."""
        content = {
            "index": dump_config(self.index),
            # the runtimes' landmarks agree to 1e-4 px: a dataset may resume on another one
            "align": {k: v for k, v in dump_config(self.align).items() if k != "runtime"},
            "masking": dump_config(self.masking),
            "variants": dump_config(self.variants),
            "format": [self.output.image_format, self.output.jpeg_quality],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]
