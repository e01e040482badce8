"""Masked 1:N identification through the service's path (issue 24, point 1): LFW people with >= 2 photos
enrol one unmasked photo (`mfr enrol`), up to 3 other photos each are probes, unmasked (control) and masked
with settings training never used (held-out N95 styles, `data.occluders` occluders), aligned on the masked
photo; single-photo people are never-enrolled probes; thresholds at per-search FPIR 1% and 0.1% come from
CelebA-299 probes. Prints rank-1 and match-right / match-wrong / unknown (/ no face) counts, time, images/s
and peak memory (this process and its pool workers).

    cd /work/wt24 && PYTHONPATH=. nice -n 10 python benchmarks/bench_masked_identify.py \
        --source ../shared/weights/mobilefacenet_casia.ckpt [--people 200] [--http] [--workers 2]

Several --source values (packages or checkpoints: a training curve) share the masked photos. Masked photos,
embeddings and galleries are cached under --cache (default outputs/bench_masked_identify)."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from mfr_ray.evaluation.masked_bench import run_benchmark
from mfr_ray.evaluation.masked_identification import BenchSettings, format_margin_study, format_table
from mfr_ray.paths import shared_dir


def main() -> None:
    shared = shared_dir()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", nargs="+", default=[str(shared / "weights" / "mobilefacenet_casia.ckpt")],
                        help="model packages or checkpoints (several: one pass over a training curve)")
    parser.add_argument("--people", type=int, default=None, help="enrolled LFW people (default: all with >= 2)")
    parser.add_argument("--probes-per-person", type=int, default=3)
    parser.add_argument("--calibration-per-identity", type=int, default=2)
    parser.add_argument("--http", action="store_true", help="send the LFW probes to /identify of `mfr serve`")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lfw", default=str(shared / "datasets" / "lfw" / "lfw-deepfunneled"))
    parser.add_argument("--celeba", default=str(shared / "datasets" / "celeba299"))
    parser.add_argument("--cache", default="outputs/bench_masked_identify")
    parser.add_argument("--json", default=None, help="write the summaries here")
    parser.add_argument("--synthetic-masks", type=int, default=0, help="enrol this many masked copies of each "
                        "photo as extra templates (mfr enrol --synthetic-masks)")
    args = parser.parse_args()
    settings = BenchSettings(people=args.people, probes_per_person=args.probes_per_person,
                             calibration_per_identity=args.calibration_per_identity)
    started = time.perf_counter()
    summaries = run_benchmark(args.source, args.lfw, args.celeba, args.cache, settings, args.workers, args.http,
                              args.synthetic_masks)
    elapsed = time.perf_counter() - started
    for summary in summaries:
        label = f"{summary['source']} ({'HTTP /identify' if summary['http'] else 'in process'})"
        print(format_table(summary, label))
        print(format_margin_study(summary))
        print(f"package {summary['package_id']}: {summary['elapsed_s']:.0f} s (enrol {summary['enrol_s']:.0f} s), "
              f"{summary['images']} images, {summary['images'] / summary['elapsed_s']:.2f} images/s; masked photos "
              f"{summary['photos_s']:.0f} s; service agreement {summary['service_agreement']}")
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"total {elapsed:.0f} s; peak RSS of one process (driver or pool worker) {peak / 2**20:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=2, default=str))


if __name__ == "__main__":
    main()
