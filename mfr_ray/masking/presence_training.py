"""Train the shipped mask-presence classifier and measure it where it was not trained.

    python -m mfr_ray.masking.presence_training [--out mfr_ray/masking/assets/mask_presence.json]

Training crops are made as a service sees a photo: CelebA-299 photos (the first 200 identities) bare, and
masked on the full frame with every mask type but the held-out one, each aligned by detection on that
photo (MTCNN, then dlib; no centre box). It reports accuracy on the other 99 identities: bare, masked
with the held-out type (N95), and under the training pipeline's non-mask occluders (never trained on),
and on bare LFW faces."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mfr_ray.masking.presence import PRESENCE_FILE, MaskPresence, fit_presence

HELD_OUT_TYPE = "N95"
TRAIN_IDENTITIES = 200


def _photos(root: Path, identities: list[str], per_identity: int) -> list[Path]:
    return [p for name in identities for p in sorted((root / name).glob("*.jpg"))[:per_identity]]


class CropMaker:
    """Bare and masked aligned crops of photos, by the service's detect-and-align path."""

    def __init__(self, mask_types: list[str], seed: int = 0):
        from mfr_ray.faces.aligner import FaceAligner
        from mfr_ray.faces.config import AlignConfig
        from mfr_ray.masking import MaskEngine, MaskingConfig

        self.aligner = FaceAligner(AlignConfig(fallbacks=["dlib"]))
        self.engine = MaskEngine(MaskingConfig(mix={t: 1.0 for t in mask_types}, seed=seed))

    def _crop(self, rgb: np.ndarray | None) -> np.ndarray | None:
        if rgb is None:
            return None
        result = self.aligner.align(rgb)
        return result.crop if result.status == "ok" and result.crop is not None else None

    def crops(self, paths: list[Path], masked: bool) -> np.ndarray:
        from mfr_ray.imageio import decode_image

        out = []
        for path in paths:
            decoded = decode_image(path.read_bytes())
            rgb = decoded.image
            if masked and rgb is not None:
                rgb = self.engine.mask(rgb, path.name).image
            crop = self._crop(rgb)
            if crop is not None:
                out.append(crop)
        return np.stack(out)


def _accuracy(model: MaskPresence, crops: np.ndarray, masked: bool) -> tuple[float, int]:
    predicted = model.probability(crops) >= 0.5
    return float(np.mean(predicted == masked)), len(crops)


def train_and_measure(shared: Path, out: Path, per_identity: int = 4, lfw_images: int = 200) -> dict:
    """Fit on the training identities, write `out`, and return the held-out accuracies."""
    from mfr_ray.masking.layers import available_mask_types
    from mfr_ray.train.augment import OccluderConfig, occlude

    celeba = shared / "datasets" / "celeba299"
    names = sorted(p.name for p in celeba.iterdir() if p.is_dir())
    train_types = [t for t in available_mask_types() if t != HELD_OUT_TYPE]
    maker, held_out = CropMaker(train_types), CropMaker([HELD_OUT_TYPE], seed=1)
    train_paths = _photos(celeba, names[:TRAIN_IDENTITIES], per_identity)
    test_paths = _photos(celeba, names[TRAIN_IDENTITIES:], 2)
    bare, masked = maker.crops(train_paths, False), maker.crops(train_paths, True)
    model = fit_presence(np.concatenate([bare, masked]), np.r_[np.zeros(len(bare)), np.ones(len(masked))],
                         f"CelebA-299 identities 1-{TRAIN_IDENTITIES}: {len(bare)} bare + {len(masked)} masked "
                         f"({', '.join(train_types)}), aligned by detection on each photo")
    model.save(out)
    test_bare = maker.crops(test_paths, False)
    lfw = shared / "datasets" / "lfw" / "lfw-deepfunneled"
    lfw_paths = [min(p.glob("*.jpg")) for p in sorted(lfw.iterdir())[: lfw_images]]
    rng = np.random.default_rng(0)
    return {
        "bare CelebA (held-out identities)": _accuracy(model, test_bare, False),
        f"{HELD_OUT_TYPE} (held-out type)": _accuracy(model, held_out.crops(test_paths, True), True),
        "occluders (never trained on)": _accuracy(model, occlude(test_bare, OccluderConfig(), rng), True),
        "bare LFW": _accuracy(model, maker.crops(lfw_paths, False), False),
        "training (in-sample)": _accuracy(model, np.concatenate([bare, masked]),
                                          np.r_[np.zeros(len(bare)), np.ones(len(masked))].astype(bool)),
    }


def main() -> None:
    from mfr_ray.paths import shared_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PRESENCE_FILE)
    parser.add_argument("--per-identity", type=int, default=4)
    args = parser.parse_args()
    started = time.perf_counter()
    results = train_and_measure(shared_dir(), args.out, args.per_identity)
    print(f"{'set':<38} {'accuracy':>9} {'crops':>6}")
    for name, (accuracy, count) in results.items():
        print(f"{name:<38} {accuracy * 100:>8.1f}% {count:>6}")
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
