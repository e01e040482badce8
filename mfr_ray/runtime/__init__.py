"""Inference runtimes for every embedding outside training: a backbone exported once to ONNX
(`mfr_ray.runtime.onnx`) and run by OpenVINO or ONNX Runtime on CPU, or kept in torch
(`mfr_ray.runtime.sessions`, registered by name in `mfr_ray.registry.RUNTIMES`).

The default is what `benchmarks/bench_embed.py` measured fastest on the build machine's CPU, at the same
embeddings (cosine >= 0.9999 to torch's on real LFW crops, tests/test_runtime.py)."""

from mfr_ray import lazy_attributes

DEFAULT_RUNTIME = "openvino"

_LAZY = {
    "RuntimeModel": "mfr_ray.runtime.sessions",
    "open_session": "mfr_ray.runtime.sessions",
    "runtime_versions": "mfr_ray.runtime.sessions",
    "ExportError": "mfr_ray.runtime.onnx",
    "export_onnx": "mfr_ray.runtime.onnx",
    "onnx_cache_file": "mfr_ray.runtime.onnx",
}

__all__ = [
    "DEFAULT_RUNTIME", "ExportError", "RuntimeModel", "export_onnx", "onnx_cache_file", "open_session",
    "runtime_versions",
]

__getattr__ = lazy_attributes(__name__, _LAZY)
