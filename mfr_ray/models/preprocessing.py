"""Aligned crops to the tensor a backbone takes, normalised as its config says (`Normalisation`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mfr_ray.models.backbone_config import Normalisation


def preprocess(crops: np.ndarray | torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """uint8 NHWC RGB crops -> float NCHW tensor scaled as (x - pixel_mean) / pixel_scale."""
    if isinstance(crops, np.ndarray):
        crops = np.ascontiguousarray(crops)
        tensor = torch.from_numpy(crops if crops.flags.writeable else crops.copy())
    else:
        tensor = crops
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    return (tensor.permute(0, 3, 1, 2).float() - normalisation.pixel_mean) / normalisation.pixel_scale
