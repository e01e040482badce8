"""A backbone exported to ONNX once: into a package folder, or into a cache keyed by the weights'
fingerprint (never beside the checkpoint, which may be `${shared}`, `s3://` or `models:/`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

OPSET = 18
CACHE_ENV = "MFR_ONNX_CACHE"
# The least cosine between an export's and torch's embeddings of a random batch before it is used.
MIN_EXPORT_COSINE = 0.9999


class ExportError(RuntimeError):
    """The backbone does not export to ONNX, or its export computes something else than torch does."""


def onnx_cache_dir() -> Path:
    """$MFR_ONNX_CACHE, else ~/.cache/mfr-ray/onnx."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mfr-ray/onnx").expanduser()


def onnx_cache_file(fingerprint: str, cache_dir: str | Path | None = None) -> Path:
    """Where the export of the weights with this fingerprint is cached; the exporter's version is part of
    the name, so a newer torch exports again."""
    import torch

    return Path(cache_dir or onnx_cache_dir()) / f"{fingerprint}-torch{torch.__version__}-opset{OPSET}.onnx"


def spec_onnx_file(model, storage=None) -> Path | None:
    """The cache file of a ModelSpec's export, keyed by its weights' fingerprint; None for fresh weights
    (a random init has no identity to cache under)."""
    return onnx_cache_file(model.fingerprint(storage)) if model.checkpoint else None


def export_onnx(net, path: str | Path, dynamic_hw: bool = False) -> Path:
    """Export `net` (eval mode, batch axis dynamic, height and width too with `dynamic_hw`) as one
    self-contained ONNX file at `path`, written atomically so concurrent actors never read half a file;
    checked against torch before it is kept."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = net.input_size
    example = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    axes = {0: torch.export.Dim("batch", min=1)}
    if dynamic_hw:
        axes |= {2: torch.export.Dim("height", min=12), 3: torch.export.Dim("width", min=12)}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as folder:
        tmp = Path(folder) / path.name
        try:
            torch.onnx.export(
                net.eval(), (example,), str(tmp), input_names=["input"],
                dynamic_shapes=(axes,), opset_version=OPSET, dynamo=True,
                external_data=False, verbose=False, report=False,
            )
            _check_export(net, tmp, 5 if dynamic_hw else 0)
        except ExportError:
            raise
        except Exception as exc:  # any exporter (or checking) failure means: this network stays in torch
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ExportError(f"{type(net).__name__} does not export to ONNX ({type(exc).__name__}: {reason})") from exc
        tmp.replace(path)
    return path


def _check_export(net, path: Path, grow: int) -> None:
    """Refuse an export whose outputs differ from torch's on another input and batch size (and, `grow`
    pixels larger, image size) than the traced one: an exporter bug, or a value baked in at tracing, must
    not go unseen."""
    import onnxruntime as ort
    import torch

    height, width = net.input_size
    x = torch.randn(3, 3, height + grow, width + grow, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = net(x)
    expected = [o.numpy() for o in (expected if isinstance(expected, tuple | list) else [expected])]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})
    cosine = min(float(np.min(_cosines(e.reshape(len(e), -1), g.reshape(len(g), -1))))
                 for e, g in zip(expected, got, strict=True))
    if not cosine >= MIN_EXPORT_COSINE:
        raise ExportError(f"{type(net).__name__}: ONNX export differs from torch (cosine {cosine:.6f})")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
