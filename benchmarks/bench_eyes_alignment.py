"""Would an eyes-only alignment of masked probes help verification against bare photos?

    python benchmarks/bench_eyes_alignment.py [--photos 300] [--seed 7] [--impostors 3]

MTCNN's nose and mouth points move on a masked photo (bench_detect_masked.py), so the all-five-point crop of
a masked probe is framed unlike its owner's bare crop. This compares, with the untouched CASIA checkpoint,
masked-vs-bare LFW pairs whose masked side is cropped (a) on all five points as deployed, (b) on the two eyes
only (a similarity onto the template's eyes) where the mask-presence classifier says masked (p > 0.5), and
(c) on the eyes for every masked probe. Masked photos: bench_detect_masked.py's (same cache). Genuine pair:
the masked photo vs another photo of the same person; impostors: vs the first photo of `--impostors` other
people. Prints TPR at FAR 1% and 0.1% per masked kind (thresholds from all impostor scores) and the runtime.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
from bench_detect_masked import SERVING, masked_photos

from mfr_ray.evaluation.detection import detect_all
from mfr_ray.evaluation.embed import Embedder
from mfr_ray.evaluation.masked_identification import N95_HELD_OUT, OCCLUDER
from mfr_ray.faces.aligner import FaceAligner
from mfr_ray.faces.config import AlignConfig
from mfr_ray.faces.geometry import fit_targets, similarity_transform, warp_with
from mfr_ray.masking.presence import MaskPresence
from mfr_ray.masking.quality import lfw_files
from mfr_ray.models.spec import ModelSpec


def pairs_for(sources: list[Path], impostors: int, seed: int) -> tuple[list[Path | None], list[list[Path]]]:
    """Per source: another photo of the same person (None if there is none) and impostor photos."""
    rng, people = random.Random(seed), sorted(p for p in sources[0].parent.parent.iterdir() if p.is_dir())
    genuine, impostor = [], []
    for source in sources:
        others = sorted(f for f in source.parent.glob("*.jpg") if f != source)
        genuine.append(others[0] if others else None)
        strangers = [p for p in rng.sample(people, impostors + 1) if p != source.parent][:impostors]
        impostor.append([min(p.glob("*.jpg")) for p in strangers])
    return genuine, impostor


def eyes_only(crop) -> np.ndarray:
    """The masked frame cropped by the similarity that puts its two eyes on the template's."""
    eyes = np.asarray(crop.aligned.landmarks)[:2]
    return warp_with(crop.aligned.frame, similarity_transform(eyes, fit_targets("112x96")[:2]), "112x96")


class Scorer:
    def __init__(self):
        self.embedder = Embedder(ModelSpec(), num_threads=1)

    def __call__(self, crops: list[np.ndarray]) -> np.ndarray:
        out = self.embedder({"crop": np.stack(crops)})
        features = out["embedding"] + out["embedding_flip"]
        return features / np.linalg.norm(features, axis=1, keepdims=True)


def tprs(probe: np.ndarray, genuine: np.ndarray, impostor: np.ndarray, kinds: list[str]) -> str:
    """TPR at FAR 1% / 0.1% per kind; `impostor` is (n, k) scores, thresholds from all of them."""
    scores = (probe * genuine).sum(1)
    text = []
    for kind in (N95_HELD_OUT, OCCLUDER):
        mine = scores[[k == kind for k in kinds]]
        rates = [f"{100 * np.mean(mine > np.quantile(impostor, 1 - far)):.1f}%" for far in (0.01, 0.001)]
        text.append(f"{kind} {' / '.join(rates)} of {len(mine)}")
    return "; ".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--impostors", type=int, default=3)
    parser.add_argument("--cache", default="outputs/bench_detect_masked")
    args = parser.parse_args()
    start = time.perf_counter()
    sources = lfw_files(args.photos, seed=args.seed)
    genuine, impostor = pairs_for(sources, args.impostors, args.seed)
    probes = [(kind, i, data) for kind, items in masked_photos(sources, Path(args.cache), 0).items()
              for i, data in items if genuine[i] is not None]
    aligner, score = FaceAligner(AlignConfig(**SERVING)), Scorer()
    found = detect_all(aligner, [data for _, _, data in probes])
    bare_files = sorted({f for _, i, _ in probes for f in [genuine[i], *impostor[i]]})
    bare = dict(zip(bare_files, detect_all(aligner, [f.read_bytes() for f in bare_files]), strict=True))
    keep = [j for j, (_, i, _) in enumerate(probes) if found[j].aligned is not None
            and all(bare[f].aligned is not None for f in [genuine[i], *impostor[i]])]
    bare_emb = dict(zip(bare_files, score([bare[f].aligned.crop for f in bare_files]), strict=True))
    gen = np.stack([bare_emb[genuine[probes[j][1]]] for j in keep])
    kinds = [probes[j][0] for j in keep]
    all5 = [found[j].aligned.crop for j in keep]
    eyes = [eyes_only(found[j]) for j in keep]
    masked = MaskPresence.load().probability(np.stack(all5)) > 0.5
    for name, crops in (("all five points (deployed)", all5),
                        (f"eyes where called masked ({masked.sum()} of {len(keep)})",
                         [e if m else a for a, e, m in zip(all5, eyes, masked, strict=True)]),
                        ("eyes for every masked probe", eyes)):
        emb = score(crops)
        imp = np.array([[e @ bare_emb[f] for f in impostor[probes[j][1]]] for e, j in zip(emb, keep, strict=True)])
        print(f"{name:<40} TPR at FAR 1% / 0.1%: {tprs(emb, gen, imp, kinds)} ({imp.size} impostor pairs)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
