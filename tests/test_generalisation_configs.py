"""The shipped generalisation configs hold out what they say: the leave-one-mask-type-out training sets never
draw the held-out type and the LFW evaluation reads that type; the unseen-settings training set never draws
the held-out styles and its LFW evaluation set draws nothing else. Checked on the mask engine's own draws."""

from __future__ import annotations

from collections import Counter

import pytest

from mfr_ray.config import load_config
from mfr_ray.masking.engine import MaskEngine
from mfr_ray.paths import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
KEYS = [f"id{i:03d}/img{i:04d}.jpg" for i in range(400)]
HELD_OUT_STYLES = {"coverage": "chin_exposed", "print": "camouflage", "valve": "valve"}


def assert_like_the_quickstart_training_set(cfg) -> None:
    """Only the masks differ from configs/prepare_celeba_112x96.yaml: same images, alignment and seed."""
    quickstart = load_config(CONFIGS / "prepare_celeba_112x96.yaml")
    assert (cfg.index, cfg.align, cfg.masking.seed, cfg.variants) == (
        quickstart.index, quickstart.align, quickstart.masking.seed, quickstart.variants
    )
    assert cfg.output.uri != quickstart.output.uri


def draws(masking, mask_type: str | None = None):
    engine = MaskEngine(masking.model_copy(update={"preload_templates": False}))
    return [engine.choose(key, mask_type) for key in KEYS]


@pytest.mark.parametrize("held_out", ["N95", "cloth"])
def test_leave_one_type_out_sets_never_draw_the_type_the_evaluation_reads(held_out):
    train = load_config(CONFIGS / f"prepare_celeba_loo_{held_out.lower()}.yaml")
    quickstart_mix = load_config(CONFIGS / "prepare_celeba_112x96.yaml").masking.mix
    counts = Counter(choice.mask_type for choice in draws(train.masking))
    assert set(counts) == set(quickstart_mix) - {held_out}  # every other type, the held-out one never
    assert min(counts.values()) > len(KEYS) / 6
    assert_like_the_quickstart_training_set(train)

    evaluation = load_config(CONFIGS / "eval_lfw_loo.yaml")
    lfw_sm = load_config(CONFIGS / "prepare_lfw_eval.yaml")
    source = evaluation.sources[held_out]
    assert source.variant == held_out and source.uri == lfw_sm.output.uri
    assert {v.name: v.mask_type for v in lfw_sm.variants}[held_out] == held_out
    assert evaluation.sources["unmasked"].uri == lfw_sm.output.uri


def test_unseen_settings_are_never_drawn_in_training_and_only_drawn_in_evaluation():
    train = load_config(CONFIGS / "prepare_celeba_unseen_styles.yaml")
    lfw = load_config(CONFIGS / "prepare_lfw_unseen_styles.yaml")
    evaluation = load_config(CONFIGS / "eval_lfw_unseen_styles.yaml")
    seen = Counter(
        (axis, choice.style[axis])
        for choice in draws(train.masking)
        for axis in HELD_OUT_STYLES
        if axis in choice.style
    )
    assert not {(axis, option) for axis, option in HELD_OUT_STYLES.items()} & set(seen)
    assert {axis for axis, _ in seen} == set(HELD_OUT_STYLES)  # each axis is drawn, with other options
    for variant in lfw.variants:
        for choice in draws(lfw.masking, variant.mask_type):
            for axis, option in HELD_OUT_STYLES.items():
                assert choice.style.get(axis, option) == option, (variant.name, choice)
    assert {s.uri for s in evaluation.sources.values()} == {lfw.output.uri}
    lfw_sm = load_config(CONFIGS / "prepare_lfw_eval.yaml")  # same LFW crops as LFW-SM, other masks
    assert (lfw.index, lfw.align, lfw.masking.seed) == (lfw_sm.index, lfw_sm.align, lfw_sm.masking.seed)
    assert set(evaluation.sources) == {"unmasked"} | {v.name for v in lfw.variants}
    assert_like_the_quickstart_training_set(train)
