"""The inference runtimes (mfr_ray/runtime): the ONNX export of every registered backbone, run by OpenVINO
and ONNX Runtime, gives torch's embeddings on real LFW crops (MTCNN-aligned, mirror included); the export
is cached by the weights' fingerprint, never beside the checkpoint; packages carry their own export and
older packages without one still load."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mfr_ray.config.common import TrackingConfig
from mfr_ray.evaluation.embed import BatchEmbedder
from mfr_ray.evaluation.sources import ImageSourceConfig, load_crops
from mfr_ray.models import create_backbone
from mfr_ray.models.backbone_config import Normalisation, backbone_config
from mfr_ray.models.spec import ModelSpec
from mfr_ray.registry import BACKBONES, RUNTIMES
from mfr_ray.runtime import DEFAULT_RUNTIME, RuntimeModel, open_session
from mfr_ray.runtime.onnx import CACHE_ENV
from mfr_ray.runtime.sessions import TorchSession

ONNX_RUNTIMES = ("openvino", "onnxruntime")
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A private ONNX cache for this module (the export runs once, both runtimes share it)."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def lfw_crops(lfw_dir) -> np.ndarray:
    """112x96 crops of 16 people's first LFW image, aligned by the evaluation's MTCNN 5-point path."""
    people = sorted(p.name for p in lfw_dir.iterdir() if (p / f"{p.name}_0001.jpg").is_file())[::200][:16]
    crops = load_crops(ImageSourceConfig(uri=str(lfw_dir)), [f"{n}/{n}_0001.jpg" for n in people])
    assert (crops.method == "mtcnn").sum() >= 12, crops.method
    return crops.crops


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _assert_same_embeddings(spec: ModelSpec, crops: np.ndarray, runtime: str) -> float:
    """Runtime vs torch on every crop and its mirror; returns the least cosine."""
    reference = BatchEmbedder(spec, runtime="torch", num_threads=1)({"crop": crops})
    embedder = BatchEmbedder(spec, runtime=runtime, num_threads=1)
    assert type(embedder.session) is RUNTIMES.get(runtime)  # not a silent fallback to torch
    got = embedder({"crop": crops})
    least = 1.0
    for key in ("embedding", "embedding_flip"):
        cosines = _cosines(reference[key], got[key])
        assert cosines.min() >= MIN_COSINE, (runtime, key, cosines)
        least = min(least, float(cosines.min()))
    assert not np.allclose(reference["embedding"], reference["embedding_flip"])  # the mirror is another input
    print(f"{spec.backbone} {runtime}: least cosine to torch {least:.7f} over {len(crops)} crops x 2")
    return least


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_runtime_matches_torch_on_real_weights_and_faces(runtime, lfw_crops, onnx_cache, shared):
    """The shared CASIA MobileFaceNet: exported once into the fingerprint-keyed cache, nothing written
    beside the `${shared}` checkpoint, the second load reuses the export."""
    weights = shared / "weights"
    before = sorted(p.name for p in weights.iterdir())
    _assert_same_embeddings(ModelSpec(), lfw_crops, runtime)
    exports = list(onnx_cache.glob("*.onnx"))
    assert [p.name.split("-")[0] for p in exports] == [ModelSpec().fingerprint()]
    mtime = exports[0].stat().st_mtime_ns
    BatchEmbedder(ModelSpec(), runtime=runtime)
    assert exports[0].stat().st_mtime_ns == mtime
    assert sorted(p.name for p in weights.iterdir()) == before


def _other_backbones() -> list:
    """The registry sweep (`make test-all`): MobileFaceNet, the default, is tested on its real weights above."""
    return [pytest.param(name, marks=[pytest.mark.slow, pytest.mark.sweep])
            for name in BACKBONES.names() if name != "mobilefacenet"]


@pytest.mark.parametrize("backbone", _other_backbones())
def test_every_backbone_exports_or_falls_back_with_a_warning(backbone, lfw_crops, onnx_cache, tmp_path):
    """Each other registered backbone with seeded random weights (saved, so torch and the runtime run the
    same ones), on crops resized to its input: the runtime's embeddings, or torch's after a warning."""
    torch.manual_seed(0)
    checkpoint = tmp_path / f"{backbone}.pt"
    torch.save(create_backbone(backbone).state_dict(), checkpoint)
    spec = ModelSpec(backbone=backbone, checkpoint=str(checkpoint))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = BatchEmbedder(spec, runtime="openvino").session
    if isinstance(session, TorchSession):
        assert any("torch instead" in str(w.message) for w in caught)
        pytest.skip(f"{backbone} does not export: runs on torch")
    for runtime in ONNX_RUNTIMES:
        _assert_same_embeddings(spec, lfw_crops, runtime)


class _Unexportable(nn.Module):
    """A network whose Python branches on a tensor's value: torch.export cannot trace it."""

    input_size = (8, 8)

    def forward(self, x):
        out = x.mean(dim=(2, 3))
        return out if float(x.max()) < 100 else -out


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_a_backbone_that_cannot_export_runs_on_torch_with_a_warning(runtime, tmp_path):
    target = tmp_path / "net.onnx"
    with pytest.warns(RuntimeWarning, match="with torch instead"):
        session = open_session(runtime, RuntimeModel(_Unexportable().eval(), target), num_threads=1)
    assert isinstance(session, TorchSession) and not target.exists()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session(x), x.mean(axis=(2, 3)), atol=1e-6)


def test_runtime_is_a_checked_setting_and_part_of_the_embedding_cache_key(lfw_dir, onnx_cache, tmp_path):
    from mfr_ray.evaluation.config import EvaluateComputeConfig, EvaluateConfig
    from mfr_ray.evaluation.runner import prepare_variants

    assert EvaluateComputeConfig().runtime == DEFAULT_RUNTIME
    with pytest.raises(ValueError, match="unknown inference runtime 'tensorrt'"):
        EvaluateComputeConfig(runtime="tensorrt")
    with pytest.raises(ValueError, match="bf16 needs runtime torch or openvino"):
        EvaluateComputeConfig(runtime="onnxruntime", bf16=True)
    keys = [p.relative_to(lfw_dir).as_posix() for p in sorted((lfw_dir / "Abdullah_Gul").glob("*.jpg"))[:4]]
    embeddings = {}
    for runtime in ("torch", "openvino"):
        cfg = EvaluateConfig(sources={"unmasked": {"uri": str(lfw_dir), "align": {"skip_detection": True}}},
                             compute={"runtime": runtime}, cache_dir=str(tmp_path), tracking={"enabled": False})
        embeddings[runtime] = prepare_variants(cfg, keys, progress=False)["unmasked"].embeddings
    cached = sorted(p.name for p in tmp_path.glob("emb-*.npz"))
    assert len(cached) == 2 and any("-openvino-" in n for n in cached) and any("-torch-" in n for n in cached)
    assert _cosines(embeddings["torch"].embedding, embeddings["openvino"].embedding).min() >= MIN_COSINE


def test_package_carries_its_export_and_an_older_package_still_loads(lfw_crops, onnx_cache, shared, tmp_path):
    from mfr_ray.serve.export import export_package
    from mfr_ray.serve.package import PACKAGE_JSON, PACKAGE_ONNX, load_package, package_id_of

    out = tmp_path / "package"
    export_package(str(shared / "weights" / "mobilefacenet_casia.ckpt"), out, tracking=TrackingConfig(enabled=False))
    spec = json.loads((out / PACKAGE_JSON).read_text())
    assert (out / PACKAGE_ONNX).is_file() and spec["runtime"] == DEFAULT_RUNTIME
    declared = backbone_config("mobilefacenet")  # what the package records comes from the backbone's config
    assert spec["preprocessing"]["input_size_hw"] == list(declared.input_size)
    assert Normalisation.from_package(spec["preprocessing"]) == declared.normalisation
    package = load_package(out)
    assert package.onnx_file() == out / PACKAGE_ONNX
    features = package.embed_crops(lfw_crops[:6])
    in_torch = load_package(out).use_runtime("torch").embed_crops(lfw_crops[:6])
    assert (features * in_torch).sum(1).min() >= MIN_COSINE

    # the package id covers the export: another model.onnx is another package
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    (changed / PACKAGE_ONNX).write_bytes((out / PACKAGE_ONNX).read_bytes() + b"\0")
    assert package_id_of(changed, spec["preprocessing"]) != spec["package_id"]

    # serving normalises as package.json says, not as a global constant
    rescaled = tmp_path / "rescaled"
    shutil.copytree(out, rescaled)
    other = json.loads(json.dumps(spec))
    other["preprocessing"]["normalisation"]["pixel_scale"] = 64.0
    (rescaled / PACKAGE_JSON).write_text(json.dumps(other))
    assert (load_package(rescaled).embed_crops(lfw_crops[:6]) * features).sum(1).max() < MIN_COSINE

    # a package from before runtimes and backbone configs (no model.onnx, no runtime, no normalisation):
    # exported into the cache on first load, normalised with the values every model had then
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / PACKAGE_ONNX).unlink()
    spec.pop("runtime")
    spec["preprocessing"].pop("normalisation")
    (old / PACKAGE_JSON).write_text(json.dumps(spec))
    files = sorted(p.name for p in old.iterdir())
    older = load_package(old)
    assert older.runtime == DEFAULT_RUNTIME and older.onnx_file().parent == Path(onnx_cache)
    np.testing.assert_allclose(older.embed_crops(lfw_crops[:6]), features, atol=1e-5)
    assert sorted(p.name for p in old.iterdir()) == files
    with pytest.raises(ValueError, match="unknown inference runtime"):
        older.use_runtime("tensorrt")
    assert older.use_runtime("onnxruntime").serving_align()["runtime"] == "onnxruntime"  # the detector too


def test_serve_runtime_option_is_checked():
    from mfr_ray.serve.app import ServeConfig

    assert ServeConfig(package="p", gallery="g").runtime is None  # the package's choice
    assert ServeConfig(package="p", gallery="g", runtime="torch").runtime == "torch"
    with pytest.raises(ValueError, match="unknown inference runtime 'tensorrt'"):
        ServeConfig(package="p", gallery="g", runtime="tensorrt")


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_mtcnn_on_a_runtime_finds_the_same_landmarks(runtime, lfw_dir, onnx_cache):
    """48 LFW images (every 100th person's first): the same detector method per image and MTCNN's five
    landmarks within 0.5 px of the torch stages' (facenet-pytorch's weights, exported once)."""
    import cv2

    from mfr_ray.faces.aligner import FaceAligner
    from mfr_ray.faces.config import AlignConfig
    from mfr_ray.runtime.mtcnn import RuntimeStage

    paths = sorted(lfw_dir.glob("*/*_0001.jpg"))[::100][:48]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    reference = FaceAligner(AlignConfig(runtime="torch", num_threads=1)).align_batch(images)
    aligner = FaceAligner(AlignConfig(runtime=runtime, num_threads=1))
    assert all(isinstance(getattr(aligner._mtcnn, s), RuntimeStage) for s in ("pnet", "rnet", "onet"))
    got = aligner.align_batch(images)
    assert [r.method for r in got] == [r.method for r in reference]
    mtcnn = [i for i, r in enumerate(reference) if r.method == "mtcnn"]
    assert len(mtcnn) >= 40
    worst = max(float(np.abs(np.subtract(got[i].landmarks, reference[i].landmarks)).max()) for i in mtcnn)
    print(f"MTCNN {runtime}: largest landmark difference to torch {worst:.2e} px over {len(mtcnn)} faces")
    assert worst <= 0.5
