"""How masks move the MTCNN landmarks and the aligned crop, per `landmark_fit` option, on real LFW faces.

Each image's full frame is masked with our engine (aligned=False, the prepare mix), then the aligner
(MTCNN, dlib fallback) runs on the unmasked and on the masked frame. Printed: the displacement of each
of the 5 points (median / p90 as % of the unmasked inter-ocular distance, % of images with the point off
by > 10%), the crop difference per fit option (the residual similarity masked-crop transform o
unmasked-crop transform^-1: shift of the template centre in px and in % of the template's eye distance,
scale %, rotation deg; mean and std feed `jitter_*`; dlib_upper_face: the transform fitted on dlib's
brows, nose bridge and eyes), how far masks move those dlib points, throughput and peak RSS. With --pairs, the untouched
checkpoint verifies that many LFW View 2 pairs (10 folds, first pairs of each fold) with the left image
unmasked and the right masked, for each fit option (crops of both sides aligned with that option).

    python benchmarks/bench_align_masked.py --images 200 --pairs 600 --twins 50
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import resource
import time

import numpy as np

from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.geometry import (
    CROP_TEMPLATES,
    LANDMARK_NAMES,
    UPPER_FACE_68,
    fit_weights,
    residual_similarity,
    similarity_transform,
    template_matrix,
    upper_face_targets,
    warp_with,
)
from mfr_ray.imageio import read_image_file
from mfr_ray.paths import shared_dir

FITS = {
    "all5": {"landmark_fit": "all5"},
    "weighted m0.2": {"landmark_fit": "weighted", "mouth_weight": 0.2},
    "weighted m0.1 n0.5": {"landmark_fit": "weighted", "mouth_weight": 0.1, "nose_weight": 0.5},
    "upper_face": {"landmark_fit": "upper_face"},
    "eyes only": {"landmark_fit": "weighted", "mouth_weight": 0.0, "nose_weight": 0.0},
    "dlib_upper_face": {"landmark_fit": "dlib_upper_face"},
}
MIX = {"surgical_blue": 1, "surgical_green": 1, "N95": 1, "cloth": 1}


_UPPER_FACE: dict = {}  # crop -> aligner with the dlib predictor; id(result) -> its 68 points


def upper_face_points(result, crop: str) -> np.ndarray | None:
    """dlib's 68 points fitted the way `landmark_fit: dlib_upper_face` fits them (None: fit rejected)."""
    if crop not in _UPPER_FACE:
        _UPPER_FACE[crop] = FaceAligner(AlignConfig(crop=crop, fallbacks=[], landmark_fit="dlib_upper_face"))
    if id(result) not in _UPPER_FACE:
        _UPPER_FACE[id(result)] = _UPPER_FACE[crop].upper_face_landmarks(result.frame, np.array(result.landmarks))
    return _UPPER_FACE[id(result)]


def crop_matrix(result, fit: dict, crop: str) -> np.ndarray:
    """The frame -> crop transform `fit` gives an aligned result (dlib_upper_face: all5 where rejected)."""
    if fit.get("landmark_fit") == "dlib_upper_face":
        points = upper_face_points(result, crop)
        if points is not None:
            return similarity_transform(points[UPPER_FACE_68], upper_face_targets(crop))
    return template_matrix(np.array(result.landmarks), crop, fit_weights(AlignConfig(**fit)))


def upper_face_table(found: dict, crop: str) -> None:
    """How far masks move the dlib points dlib_upper_face fits on (mean over the 26 points per image)."""
    moves, rejected = [], 0
    for plain, covered, _ in found.values():
        a, b = upper_face_points(plain, crop), upper_face_points(covered, crop)
        if a is None or b is None:
            rejected += 1
            continue
        iod = np.linalg.norm(np.array(plain.landmarks[1]) - np.array(plain.landmarks[0]))
        moves.append(100 * np.linalg.norm(b[UPPER_FACE_68] - a[UPPER_FACE_68], axis=1).mean() / iod)
    moves = np.array(moves)
    print(f"\ndlib upper-face points (brows, nose bridge, eyes) masked vs unmasked: mean per image "
          f"median {np.median(moves):.1f} / p90 {np.percentile(moves, 90):.1f} % of the eye distance; "
          f"fits rejected on {rejected} of {len(found)} images")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pair_sample(pairs_per_fold_class: int):
    from mfr_ray.evaluation.verification import read_pairs

    pairs = read_pairs(shared_dir() / "datasets" / "lfw" / "pairs.txt")
    return pairs.subset(pairs.first_per_fold(pairs_per_fold_class))


def detect_all(keys: list[str], crop: str):
    """{key: (unmasked result, masked result, masked frame, mask type)}, the per-image time and failures."""
    from tqdm import tqdm

    from mfr_ray.masking import MaskEngine, MaskingConfig

    root = shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled"
    aligner = FaceAligner(AlignConfig(crop=crop, fallbacks=["dlib"]))
    engine = MaskEngine(MaskingConfig(mix=MIX, seed=0))
    out, failures = {}, {"mask": 0, "unmasked_detect": 0, "masked_detect": 0}
    start = time.perf_counter()
    for key in tqdm(keys, desc="mask + detect", unit="image"):
        frame = read_image_file(root / key).image
        masked = engine.mask(frame, key, aligned=False)
        if masked.image is None or masked.record.status != "ok":
            failures["mask"] += 1
            continue
        plain, covered = aligner.align_batch([frame, masked.image])
        failures["unmasked_detect"] += plain.status != "ok"
        failures["masked_detect"] += plain.status == "ok" and covered.status != "ok"
        if plain.status == "ok" and covered.status == "ok":
            out[key] = (plain, covered, masked.record.mask_type)
    return out, (time.perf_counter() - start) / max(len(keys), 1), failures


def displacement_table(found: dict) -> None:
    offsets = []
    for plain, covered, _ in found.values():
        a, b = np.array(plain.landmarks), np.array(covered.landmarks)
        offsets.append(np.linalg.norm(b - a, axis=1) / np.linalg.norm(a[1] - a[0]))
    offsets = 100 * np.array(offsets)
    print(f"\nlandmark displacement masked vs unmasked frame ({len(offsets)} images), % of inter-ocular distance")
    print(f"{'point':<12} {'median':>7} {'p90':>7} {'> 10%':>7}")
    for j, name in enumerate(LANDMARK_NAMES):
        print(f"{name:<12} {np.median(offsets[:, j]):7.1f} {np.percentile(offsets[:, j], 90):7.1f} "
              f"{(offsets[:, j] > 10).mean():7.1%}")
    print(f"images with any point off by > 10%: {(offsets.max(1) > 10).mean():.1%}")
    methods = [f"{p.method}->{c.method}" for p, c, _ in found.values()]
    print("detectors (unmasked->masked):", {m: methods.count(m) for m in sorted(set(methods))})


def robust_sigma(values: np.ndarray) -> float:
    """Standard deviation read off the median absolute deviation: a few failed fits (a crop 50% off)
    would otherwise set the spread of the whole distribution."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def crop_difference_table(found: dict, crop: str) -> None:
    template = CROP_TEMPLATES[crop][1]
    centre, eye_distance = template.mean(0), float(np.linalg.norm(template[1] - template[0]))
    print(f"\ncrop difference masked vs unmasked per fit option ({crop}; template eye distance {eye_distance:.1f} px);"
          "\n|x| median/p90; mean and robust sigma in the units of jitter_* (shift: % of the eye distance, + = "
          "right/down; scale: %; rotation: deg)")
    print(f"{'fit':<20} {'shift px':>12} {'shift x mean/sd':>16} {'shift y mean/sd':>16} {'scale % |x|':>12} "
          f"{'mean/sd':>12} {'rot deg |x|':>12} {'mean/sd':>11}")
    for name, fit in FITS.items():
        shifts, scales, rotations = [], [], []
        for plain, covered, _ in found.values():
            ref, mat = crop_matrix(plain, fit, crop), crop_matrix(covered, fit, crop)
            shift, scale, rotation = residual_similarity(mat, ref, centre)
            shifts.append(100 * shift / eye_distance)
            scales.append(100 * scale)
            rotations.append(rotation)
        shifts, scales, rotations = np.array(shifts), np.array(scales), np.array(rotations)
        norm = np.linalg.norm(shifts, axis=1) * eye_distance / 100

        def pair(v: np.ndarray) -> str:
            return f"{v.mean():+6.1f}/{robust_sigma(v):4.1f}"

        print(f"{name:<20} {np.median(norm):5.2f}/{np.percentile(norm, 90):5.2f} {pair(shifts[:, 0]):>16} "
              f"{pair(shifts[:, 1]):>16} {np.median(np.abs(scales)):5.1f}/{np.percentile(np.abs(scales), 90):5.1f} "
              f"{pair(scales):>12} {np.median(np.abs(rotations)):5.2f}/{np.percentile(np.abs(rotations), 90):5.2f} "
              f"{pair(rotations):>11}")


def verification_table(found: dict, pairs, crop: str) -> None:
    from mfr_ray.evaluation.embed import BatchEmbedder
    from mfr_ray.evaluation.verification import l2_normalize
    from mfr_ray.models.spec import ModelSpec

    keep = np.array([a in found and b in found for a, b in zip(pairs.left, pairs.right, strict=True)])
    pairs = pairs.subset(keep)
    embedder = BatchEmbedder(ModelSpec(), flip=True)
    keys = set(pairs.left) | set(pairs.right)

    def features(crops: np.ndarray) -> np.ndarray:
        parts = [embedder({"crop": crops[s : s + 64]}) for s in range(0, len(crops), 64)]
        return l2_normalize(np.concatenate([p["embedding"] + p["embedding_flip"] for p in parts]))

    print(f"\nverification, untouched checkpoint, {len(pairs)} LFW pairs (left unmasked, right masked), 10 folds")
    print(f"{'fit':<20} {'acc %':>7} {'TPR@FAR=1% %':>13} {'unmasked acc %':>15}")
    for name, fit in FITS.items():
        plain = {k: warp_with(found[k][0].frame, crop_matrix(found[k][0], fit, crop), crop) for k in keys}
        covered = {k: warp_with(found[k][1].frame, crop_matrix(found[k][1], fit, crop), crop) for k in set(pairs.right)}
        left = features(np.stack([plain[k] for k in pairs.left]))
        right = features(np.stack([covered[k] for k in pairs.right]))
        right_plain = features(np.stack([plain[k] for k in pairs.right]))
        verification_row(pairs, name, left, right, right_plain)
        if name == "all5":  # what `masked_twin: reuse` trains on: the masked frame cut with the unmasked fit
            reused = {k: warp_with(found[k][1].frame, crop_matrix(found[k][0], fit, crop), crop)
                      for k in set(pairs.right)}
            reused_features = features(np.stack([reused[k] for k in pairs.right]))
            verification_row(pairs, "all5, unmasked fit", left, reused_features, right_plain)


def verification_row(pairs, name: str, left: np.ndarray, right: np.ndarray, right_plain: np.ndarray) -> None:
    """Accuracy and TPR@FAR=1% with the right images masked, and accuracy with them unmasked."""
    from mfr_ray.evaluation.verification import cosine_scores, kfold_verification

    masked = kfold_verification(cosine_scores(left, right), pairs.same, pairs.fold, [0.01]).summary()
    unmasked = kfold_verification(cosine_scores(left, right_plain), pairs.same, pairs.fold, [0.01]).summary()
    print(f"{name:<20} {100 * masked['accuracy_mean']:7.2f} {100 * masked['tpr_at_far1pct_mean']:13.2f} "
          f"{100 * unmasked['accuracy_mean']:15.2f}")


def twin_cost(keys: list[str], crop: str) -> None:
    """Per-image CPU time of one masked twin in each `masked_twin` mode (alignment of the unmasked frame
    excluded: every mode shares it)."""
    from mfr_ray.data.twins import masked_twins
    from mfr_ray.masking import MaskEngine, MaskingConfig

    root = shared_dir() / "datasets" / "lfw" / "lfw-deepfunneled"
    engine = MaskEngine(MaskingConfig(mix=MIX, seed=0))
    print(f"\nmasked twin cost ({len(keys)} images, one twin each, process CPU)")
    for mode in ("reuse", "detect", "jitter"):
        aligner = FaceAligner(AlignConfig(crop=crop, fallbacks=["dlib"], masked_twin=mode))
        results = aligner.align_batch([read_image_file(root / k).image for k in keys])
        aligned = [(a, k) for a, k in zip(results, keys, strict=True) if a.usable]
        start = time.process_time()
        twins = [masked_twins(aligner, engine, a, [(k, None)])[0] for a, k in aligned]
        ms = 1000 * (time.process_time() - start) / len(aligned)
        notes = sum(bool(t.reason) for t in twins)
        print(f"{mode:<8} {ms:7.1f} ms/image ({1000 / ms:5.1f} images/s); twins with a fallback note: {notes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="LFW pair images measured for displacement")
    parser.add_argument("--pairs", type=int, default=0, help="LFW pairs for the verification check (0 = skip)")
    parser.add_argument("--crop", default="112x96")
    parser.add_argument("--twins", type=int, default=0, help="images for the masked-twin cost per mode (0 = skip)")
    args = parser.parse_args()
    per_class = max(1, -(-max(args.pairs, args.images // 2) // 20))
    pairs = pair_sample(per_class)
    if args.pairs:
        pairs = pairs.subset(pairs.first_per_fold(-(-args.pairs // 20)))
    keys = list(dict.fromkeys(pairs.left + pairs.right))
    if not args.pairs:
        keys = keys[: args.images]
    if args.twins:
        twin_cost(keys[: args.twins], args.crop)
    found, seconds, failures = detect_all(keys, args.crop)
    print(f"\n{len(keys)} images: {1 / seconds:.1f} images/s (mask full frame + detect both, 1 thread), "
          f"failures {failures}, peak RSS {rss_mib():.0f} MiB")
    sample = dict(list(found.items())[: args.images])
    displacement_table(sample)
    crop_difference_table(sample, args.crop)
    upper_face_table(sample, args.crop)
    if args.pairs:
        verification_table(found, pairs, args.crop)
    print(f"\npeak RSS {rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
