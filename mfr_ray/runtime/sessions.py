"""One small session class per runtime, registered by name (`RUNTIMES`): `session.run(x)` maps a float32
NCHW batch to the network's outputs as float32 arrays, `session(x)` to the first (a backbone's (n, d)
embeddings of a batch preprocessed as `mfr_ray.models.preprocessing` does)."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mfr_ray.registry import RUNTIMES
from mfr_ray.runtime.onnx import ExportError, export_onnx


@dataclass
class RuntimeModel:
    """A loaded network and where its ONNX file is (or will be cached once exported); `onnx_file` None
    exports into a temporary folder that lives as long as this object. `dynamic_hw`: the export takes any
    input height and width (a fully convolutional detector stage), not only `net.input_size`."""

    net: object  # nn.Module in eval mode
    onnx_file: Path | None = None
    dynamic_hw: bool = False
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def onnx(self) -> Path:
        """The ONNX file, exported first when it is not there yet (ExportError when it cannot be)."""
        if self.onnx_file is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mfr-onnx-")
            self.onnx_file = Path(self._tmp.name) / "model.onnx"
        if not self.onnx_file.is_file():
            export_onnx(self.net, self.onnx_file, self.dynamic_hw)
        return self.onnx_file


class _Session:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output: a backbone's embeddings."""
        return self.run(x)[0]


@RUNTIMES.register("torch")
class TorchSession(_Session):
    """Eager torch on CPU, channels-last (1.4x faster for MobileFaceNet's depthwise convolutions, same
    numbers); bf16 runs under autocast."""

    def __init__(self, model: RuntimeModel, num_threads: int | None = None, bf16: bool = False):
        import torch

        self.net = model.net.to(memory_format=torch.channels_last)
        self.bf16 = bf16

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(x)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(batch)
        return [o.float().numpy() for o in (out if isinstance(out, tuple | list) else [out])]


@RUNTIMES.register("onnxruntime")
class OnnxRuntimeSession(_Session):
    """ONNX Runtime's CPUExecutionProvider (float32 only: bf16 is refused, not silently ignored)."""

    def __init__(self, model: RuntimeModel, num_threads: int | None = None, bf16: bool = False):
        import onnxruntime as ort

        if bf16:
            raise ValueError("runtime onnxruntime computes in float32 only; bf16 needs runtime torch or openvino")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or 0  # 0: one per physical core
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model.onnx()), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})


@RUNTIMES.register("openvino")
class OpenVinoSession(_Session):
    """OpenVINO on CPU. The precision is pinned to f32 (OpenVINO would pick bf16 by itself on CPUs that
    have it, giving accuracy away unasked) unless bf16 is asked for."""

    def __init__(self, model: RuntimeModel, num_threads: int | None = None, bf16: bool = False):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.request = ov.Core().compile_model(str(model.onnx()), "CPU", config).create_infer_request()

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return [o.copy() for o in result.to_tuple()]  # the request reuses its buffers


def open_session(runtime: str, model: RuntimeModel, num_threads: int | None = None, bf16: bool = False):
    """The session of `runtime` for `model`; a network that cannot export runs in torch, with a warning."""
    try:
        return RUNTIMES.create(runtime, model, num_threads, bf16)
    except ExportError as exc:
        warnings.warn(f"runtime {runtime}: {exc}; running it with torch instead", RuntimeWarning, stacklevel=2)
        return RUNTIMES.create("torch", model, num_threads, bf16)


def runtime_versions() -> dict[str, str]:
    """Each registered runtime's library version, or why it does not import."""
    import importlib

    versions = {}
    for name in RUNTIMES.names():  # each runtime is named like the library it imports
        try:
            versions[name] = str(importlib.import_module(name).__version__).split("-")[0]
        except ImportError as exc:
            versions[name] = f"not installed ({exc})"
    return versions
