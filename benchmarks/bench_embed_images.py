"""Where one `/identify` photo's time goes inside the embedder: `ModelPackage.embed_images` stage by stage,
in this process (no Serve), on `bench_serve.py`'s probes (masked LFW photos cut to 160x160 PNG).

    python benchmarks/bench_embed_images.py [--package PKG] [--people 30] [--threads 1 2] [--repeats 2]

Per thread count: the median ms per photo of decoding, detection and alignment (MTCNN, with the rescue
pass where it runs), the network on the aligned crop and its mirror, the mask-presence classifier, and the
whole `embed_images` call timed separately; then the process's peak RSS. Without --package the shared
CASIA checkpoint is exported as `bench_serve.py` does.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = ("decode", "align", "network", "mask presence", "embed_images")


def stage_times(package, png: bytes) -> dict[str, float]:
    """ms of each stage for one photo, then of the whole call."""
    from mfr_ray.imageio import decode_image

    aligner, _ = package._models()
    marks = [time.perf_counter()]
    image = decode_image(png).image
    marks.append(time.perf_counter())
    crop = aligner.align_batch([image])[0].crop
    marks.append(time.perf_counter())
    if crop is not None:
        package.embed_crops(crop[None])
        marks.append(time.perf_counter())
        package.mask_presence().probability(crop[None])
        marks.append(time.perf_counter())
    else:
        marks += [marks[-1], marks[-1]]
    package.embed_images([png])
    marks.append(time.perf_counter())
    return {stage: 1000 * (b - a) for stage, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}


def main() -> None:
    from bench_serve import demo_package, lfw_people, masked_probes

    from mfr_ray.serve.package import load_package

    parser = argparse.ArgumentParser()
    parser.add_argument("--package", default=None)
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="passes over the probes per thread count")
    args = parser.parse_args()
    package_dir = args.package or str(demo_package(Path(tempfile.mkdtemp(prefix="bench-stages-")) / "package"))
    probes = [png for _, png in masked_probes(lfw_people(args.people))]
    print(f"ms per photo, median over {len(probes)} masked 160x160 PNGs x {args.repeats}; package {package_dir}")
    print(f"{'threads':>7} " + " ".join(f"{stage:>13}" for stage in STAGES))
    for threads in args.threads:
        package = load_package(package_dir, num_threads=threads)
        package.embed_images(probes[:2])  # loads the detector, the network and the classifier
        rows = [stage_times(package, png) for _ in range(args.repeats) for png in probes]
        print(f"{threads:>7} " + " ".join(f"{statistics.median(r[s] for r in rows):>13.2f}" for s in STAGES))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
