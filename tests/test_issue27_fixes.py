"""Defects of issue 27, point 4, each pinned by a test that fails without its fix."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from mfr_ray.evaluation.runner import _far_notes
from mfr_ray.evaluation.verification import PairList


def pairs(n_folds: int, per_fold: int = 40) -> PairList:
    fold = np.repeat(np.arange(n_folds), per_fold)
    same = np.tile(np.arange(per_fold) < per_fold // 2, n_folds)  # half genuine, half impostor per fold
    keys = [f"k{i}" for i in range(len(fold))]
    return PairList(keys, keys, same, fold)


@pytest.mark.parametrize(("n_folds", "said"), [(2, "1 training fold (20 impostors"), (10, "9 training folds (180")])
def test_far_note_counts_the_training_folds(n_folds, said):
    """`pairs.limit_folds=2` (the --quick quickstart): the threshold is fit on 1 fold, not '9 training folds'."""
    (note,) = _far_notes(pairs(n_folds), [0.001])
    assert said in note and ("9 training" not in note or n_folds == 10)


def test_registry_with_a_plugin_that_fails_to_import_raises_on_every_lookup(tmp_path, monkeypatch):
    """One plug-in module that fails to import: every lookup raises naming it (it used to be marked loaded
    first, leaving a registry without that module's entries on every later lookup)."""
    from mfr_ray.registry import Registry

    package = tmp_path / "plugpkg27"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text("from plugpkg27 import REG\nREG.add('good', 1)\n")
    (package / "broken.py").write_text("raise RuntimeError('no such dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("widget", modules=("plugpkg27",))
    import plugpkg27

    plugpkg27.REG = registry
    for _ in range(2):
        with pytest.raises(ImportError, match=r"widget registry: module plugpkg27\.broken failed to import"):
            "good" in registry  # noqa: B015
        with pytest.raises(ImportError, match="plugpkg27.broken"):
            registry.names()
    (package / "broken.py").write_text("")  # fixed: the next lookup loads the rest
    sys.modules.pop("plugpkg27.broken", None)
    assert registry.names() == ["good"]


def test_extending_doc_states_the_default_mask_as_the_code_draws_it():
    """docs/extending.md said the default mix lists types in registration order; with no mask_type and no
    mix the engine draws `surgical` only."""
    from mfr_ray.masking import MaskingConfig
    from mfr_ray.masking.engine import MaskEngine
    from mfr_ray.paths import PROJECT_ROOT

    engine = MaskEngine(MaskingConfig(preload_templates=False))
    assert {engine.choose(f"id{i}/img{i}.jpg", None).mask_type for i in range(200)} == {"surgical"}
    doc = " ".join((PROJECT_ROOT / "docs" / "extending.md").read_text().split())
    assert "registration order" not in doc and "the default is `surgical`" in doc


def test_config_shim_comment_matches_the_manifests():
    """The `--config` shim's docstring said RayJob manifests need it; no shipped manifest passes `--config`."""
    from mfr_ray.cli import job_arguments
    from mfr_ray.paths import PROJECT_ROOT

    manifests = [p.read_text() for p in (PROJECT_ROOT / "cluster").rglob("*.yaml")]
    uses_shim = any("--config" in text for text in manifests)
    claims = "still in RayJob manifests" in " ".join((job_arguments.__doc__ or "").split())
    assert claims == uses_shim
    assert job_arguments(["--config", "c.yaml", "a=1"]) == ["c.yaml", "a=1"]  # the shim itself still works


def test_every_public_function_of_face_reading_has_a_caller():
    """`data/align.py: warp_to_template` had no caller; a public function of the face-reading modules
    (`mfr_ray/faces/`, where align.py went) is used somewhere (the package, jobs, benchmarks) besides its
    own definition."""
    import ast
    import re

    from mfr_ray.paths import PROJECT_ROOT

    modules = sorted((PROJECT_ROOT / "mfr_ray" / "faces").glob("*.py"))
    names = [n.name for module in modules for n in ast.parse(module.read_text()).body
             if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    assert "similarity_transform" in names
    sources = [p.read_text() for folder in ("mfr_ray", "jobs", "benchmarks")
               for p in (PROJECT_ROOT / folder).rglob("*.py")]
    unused = [name for name in names
              if sum(len(re.findall(rf"\b{name}\b", text)) for text in sources) < 2]
    assert not unused, f"no caller: {unused}"


def test_build_model_does_not_repeat_the_config_checkpoint_check():
    """`train/model.py: build_model` repeated TrainConfig's "a frozen teacher needs model.checkpoint"
    check (unreachable: a config without one never loads). The config is where it is made."""
    import inspect

    from mfr_ray.config import ConfigError, load_config
    from mfr_ray.train.model import build_model

    assert "model.checkpoint is None" not in inspect.getsource(build_model)
    with pytest.raises(ConfigError, match=r"teacher frozen needs model\.checkpoint"):
        load_config("configs/train_mobilefacenet_teacher.yaml", ["model.checkpoint=null", "model.batchnorm=train"])
