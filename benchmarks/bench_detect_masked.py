"""Does the service's detector chain find masked faces as well as bare ones, without taking non-faces?

    python benchmarks/bench_detect_masked.py [--photos 300] [--nonfaces 300] [--seed 24]

Photos: a seeded sample of LFW deep-funneled, each masked the way the masked-identification benchmark
masks its probes (`masking.held_out.mask_photo`: the held-out N95 styles, and the `data.occluders`
shapes), cached under --cache. Non-faces: `evaluation.nonfaces.nonface_set` (backgrounds, borders, hair,
clothes, hands and objects cut from LFW and CelebA-299 frames away from the face). Every image goes through
the service's path (`read_decode_align` with the serving alignment: MTCNN, then dlib, never the centre
box) with the rescue pass (`align.rescue`), which runs only where MTCNN and dlib found nothing, so the
chain without it is the same run with the rescued faces counted as misses. Prints, per set, faces found of
files in (and by which detector) without and with the rescue, every non-face accepted (by key, to be looked
at), the shift of MTCNN's five points between each bare photo and its masked copies (inter-ocular
distances), and the runtime.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mfr_ray.evaluation.detection import count, detect_all, landmark_shift, shift_summary
from mfr_ray.evaluation.nonfaces import nonface_set
from mfr_ray.faces.aligner import RESCUE_METHOD, FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.reading import FaceCrop
from mfr_ray.imageio import Status, encode_image
from mfr_ray.masking.held_out import N95_HELD_OUT, OCCLUDER, mask_photo
from mfr_ray.masking.quality import lfw_files, lfw_key

SERVING = {"crop": "112x96", "fallbacks": ["dlib"], "num_threads": 1}  # the shipped package's, less the centre box


def masked_photos(sources: list[Path], cache: Path, seed: int) -> dict[str, list[tuple[int, bytes]]]:
    """(source index, masked copy) of each source masked both ways (cached); an N95 that could not be fitted
    became an occluder in `mask_photo` and is counted with the occluders, as the identification benchmark
    counts it."""
    sets: dict[str, list[tuple[int, bytes]]] = {N95_HELD_OUT: [], OCCLUDER: []}
    manifest_file = cache / f"kinds-seed{seed}.json"
    kinds = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    for index, source in enumerate(sources):
        for planned in (N95_HELD_OUT, OCCLUDER):
            out = cache / f"seed{seed}" / planned / lfw_key(source)
            name = f"{planned}/{lfw_key(source)}"
            if name not in kinds or not out.is_file():
                kinds[name] = mask_photo(str(source), planned, str(out), seed)
            if kinds[name] in sets:
                sets[kinds[name]].append((index, out.read_bytes()))
    manifest_file.parent.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(kinds))
    return sets


def report(name: str, crops: list[FaceCrop], keys: list[str] | None = None) -> None:
    """Faces found before the rescue pass (its finds counted as misses, which they were) and after."""
    after = count(crops)
    before = count([FaceCrop(Status.NO_FACE, "", "none") if c.method == RESCUE_METHOD else c for c in crops])
    print(f"  {name:<24} before {before.line():<34} after {after.line()}")
    for key, crop in zip(keys or [], crops, strict=False):
        if crop.status == Status.OK:
            print(f"      accepted: {key} ({crop.method}, score {crop.aligned.score:.3f})")


def shifts(crops: list[FaceCrop], masked: list[tuple[int, FaceCrop]]) -> str:
    """MTCNN's points on each masked copy vs on its bare photo (pairs where MTCNN found both)."""
    found = [shift for shift in (landmark_shift(crops[i], crop) for i, crop in masked) if shift is not None]
    text = ", ".join(f"{k} {a:.3f}/{b:.3f}" for k, (a, b) in shift_summary(found).items())
    return f"{len(found)} pairs, median/p90: {text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=300, help="LFW photos (each bare, N95-masked, occluded)")
    parser.add_argument("--nonfaces", type=int, default=300, help="non-face crops per non-face seed")
    parser.add_argument("--nonface-seeds", type=int, nargs="+", default=[0, 1], help="0 is the tests' set")
    parser.add_argument("--seed", type=int, default=7, help="LFW sample (the rescue was chosen on seed 24)")
    parser.add_argument("--cache", default="outputs/bench_detect_masked")
    args = parser.parse_args()
    start = time.perf_counter()
    sources = lfw_files(args.photos, seed=args.seed)
    masked = masked_photos(sources, Path(args.cache), 0)
    nonfaces = [n for seed in args.nonface_seeds for n in nonface_set(args.nonfaces, seed)]
    prepared_s = time.perf_counter() - start
    aligner = FaceAligner(AlignConfig(**SERVING, rescue=True))
    started = time.perf_counter()
    crops = {"bare LFW": detect_all(aligner, [p.read_bytes() for p in sources])}
    for kind in (N95_HELD_OUT, OCCLUDER):
        crops[kind] = detect_all(aligner, [data for _, data in masked[kind]])
    crops["non-faces"] = detect_all(aligner, [encode_image(n.image, "jpg", quality=95) for n in nonfaces])
    detect_s, images = time.perf_counter() - started, sum(len(c) for c in crops.values())
    print(f"Faces found (ok) of files in, serving chain without / with the rescue pass (seed {args.seed}, "
          f"non-face seeds {args.nonface_seeds}):")
    for name, found in crops.items():
        report(name, found, [n.key for n in nonfaces] if name == "non-faces" else None)
    print("MTCNN's five points on the masked copy vs the same bare photo (inter-ocular distances):")
    for kind in (N95_HELD_OUT, OCCLUDER):
        paired = [(i, crop) for (i, _), crop in zip(masked[kind], crops[kind], strict=True)]
        print(f"  {kind}: {shifts(crops['bare LFW'], paired)}")
    print(f"{images} images detected in {detect_s:.1f} s ({images / detect_s:.1f} img/s, 1 thread); "
          f"masking and non-face set {prepared_s:.0f} s; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
