"""MTCNN's three stages (facenet-pytorch's weights) on an inference runtime: each exported once into the
ONNX cache, keyed by its weights file's hash, and put back in place of the torch stage as a module that
returns what that stage returns, so `mfr_ray.faces.mtcnn.mtcnn_detect` runs unchanged on any runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from mfr_ray.runtime.onnx import onnx_cache_file
from mfr_ray.runtime.sessions import RuntimeModel, open_session

# Traced input (H, W) of each stage: P-Net is fully convolutional (one pyramid level after another, any
# size), R-Net and O-Net take fixed 24x24 and 48x48 box crops.
STAGES = {"pnet": ((48, 64), True), "rnet": ((24, 24), False), "onet": ((48, 48), False)}


class RuntimeStage(nn.Module):
    """One stage on a runtime session: NCHW float tensor in, the torch stage's output tuple out."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(o) for o in self.session.run(x.numpy()))


def _weights_file(stage: str) -> Path:
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).parent / "data" / f"{stage}.pt"


def run_stages_on(mtcnn, runtime: str, num_threads: int | None = None) -> None:
    """Swap `mtcnn`'s pnet/rnet/onet for runtime sessions (torch: leave them); a stage that cannot export
    stays in torch with a warning."""
    if runtime == "torch":
        return
    for stage, (size, dynamic_hw) in STAGES.items():
        net = getattr(mtcnn, stage)
        net.input_size = size
        digest = hashlib.sha256(_weights_file(stage).read_bytes()).hexdigest()[:16]
        model = RuntimeModel(net, onnx_cache_file(f"mtcnn-{stage}-{digest}"), dynamic_hw=dynamic_hw)
        setattr(mtcnn, stage, RuntimeStage(open_session(runtime, model, num_threads)))
