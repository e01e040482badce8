"""Contact sheets of every mask type and style on real LFW faces, for docs/masking.md:
docs/img/masks_types.png (each type, front and turned faces), docs/img/masks_styles_wear.png (each coverage,
strap and valve style), docs/img/masks_styles_prints.png (each print style), docs/img/masks_aligned.png (the three
aligned layouts) and docs/img/occluders.png (training's random occluders, `data.occluders`, one row per fill).

    python benchmarks/masks_contact_sheet.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.imageio import read_image_file
from mfr_ray.masking import MaskEngine, MaskingConfig, available_mask_types
from mfr_ray.masking.config import COVERAGE_STYLES, PRINT_STYLES
from mfr_ray.masking.quality import lfw_files
from mfr_ray.paths import PROJECT_ROOT
from mfr_ray.train.augment import FILLS, OccluderConfig, occlude

CELL = 96  # pixels per face in the sheet
CROP = (45, 40, 205, 200)  # the face part of a 250x250 LFW deep-funneled image


def labelled_row(label: str, cells: list[np.ndarray]) -> np.ndarray:
    strip = Image.new("RGB", (130, CELL), "white")
    ImageDraw.Draw(strip).text((4, CELL // 2 - 6), label, fill="black")
    return np.hstack(
        [np.asarray(strip), *[cv2.resize(c, (CELL, CELL), interpolation=cv2.INTER_AREA) for c in cells]]
    )


def masked(
    engine: MaskEngine, image: np.ndarray, key: str, mask_type: str, aligned: bool = False
) -> np.ndarray:
    result = engine.mask(image, key, mask_type=mask_type, aligned=aligned)
    shown = result.image if result.image is not None else image // 3
    return shown if aligned else shown[CROP[1] : CROP[3], CROP[0] : CROP[2]]


def save(rows: list[np.ndarray], path: Path) -> None:
    Image.fromarray(np.vstack(rows)).quantize(256, dither=Image.Dither.NONE).save(
        path, optimize=True
    )  # small files
    print(f"{path} {path.stat().st_size / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "img")
    parser.add_argument("--faces", type=int, default=5)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = lfw_files(args.faces, seed=8)
    faces = [read_image_file(f).image for f in files]
    engine = MaskEngine(MaskingConfig(seed=2))
    types = available_mask_types()
    save(
        [labelled_row(t, [masked(engine, f, f"{i}", t) for i, f in enumerate(faces)]) for t in types],
        args.out / "masks_types.png",
    )

    for name, axes in (
        (
            "wear",
            (
                ("coverage", COVERAGE_STYLES, "surgical"),
                ("straps", ("ear_loops", "none"), "KN95"),
                ("valve", ("valve", "no_valve"), "N95"),
            ),
        ),
        ("prints", (("print", PRINT_STYLES, "cloth"),)),
    ):
        rows = []
        for axis, options, mask_type in axes:
            for option in options:
                styled = MaskEngine(MaskingConfig(seed=2, style={axis: {option: 1}}, preload_templates=False))
                cells = [masked(styled, f, f"{i}", mask_type) for i, f in enumerate(faces)]
                rows.append(labelled_row(f"{axis} = {option}", cells))
        save(rows, args.out / f"masks_styles_{name}.png")

    rows, aligned_by_layout = [], {}
    for crop in ("160x160", "112x112", "112x96"):
        aligned = [r.crop for r in FaceAligner(AlignConfig(crop=crop, num_threads=1)).align_batch(faces)]
        aligned_by_layout[crop] = aligned
        cells = [
            masked(engine, a, f"{i}", t, aligned=True)
            for i, (a, t) in enumerate(zip(aligned, types[::2], strict=False))
        ]
        rows.append(
            labelled_row(
                f"aligned {crop}",
                [np.pad(c, ((0, 0), (0, max(0, c.shape[0] - c.shape[1])), (0, 0))) for c in cells],
            )
        )
    save(rows, args.out / "masks_aligned.png")

    crops = np.stack(aligned_by_layout["112x96"])  # the training layout, aligned once above
    square = lambda images: [np.pad(c, ((0, 0), (8, 8), (0, 0))) for c in images]
    rng = np.random.default_rng(2)
    rows = [labelled_row("unmasked", square(crops))]
    for fill in FILLS:
        shown = occlude(crops, OccluderConfig(prob=1.0, fills=[fill]), rng)
        rows.append(labelled_row(f"occluder: {fill}", square(shown)))
    save(rows, args.out / "occluders.png")


if __name__ == "__main__":
    main()
