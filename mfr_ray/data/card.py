"""Dataset card and end-of-job checks, both built from the shard markers (so they cover shards done by
earlier, interrupted runs too)."""

from __future__ import annotations

import subprocess
import time
from collections import Counter

from mfr_ray import __version__
from mfr_ray.config import dump_config
from mfr_ray.data.config import PrepareConfig
from mfr_ray.data.index import DatasetIndex
from mfr_ray.data.layout import CARD_JSON, CARD_MD, DatasetLayout
from mfr_ray.imageio import UNMASKED
from mfr_ray.paths import PROJECT_ROOT


def code_version() -> dict:
    """Package version plus the git commit (and whether the tree had local changes) when available."""
    version = {"package": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
                check=False,
            )
            version["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def merge_counts(target: dict[str, Counter], source: dict[str, dict]) -> None:
    for key, counts in source.items():
        target.setdefault(key, Counter()).update(counts)


def aggregate_markers(markers: list[dict]) -> dict:
    """Sum the per-shard counts: rows per variant, statuses, mask types, alignment methods, identities,
    stage seconds and the nodes that did the work."""
    status: dict[str, Counter] = {}
    mask_types: dict[str, Counter] = {}
    rows, methods, identities, seconds, nodes = Counter(), Counter(), Counter(), Counter(), Counter()
    for marker in markers:
        rows.update(marker["files"])
        merge_counts(status, marker["status"])
        merge_counts(mask_types, marker["mask_types"])
        methods.update(marker["align_methods"])
        identities.update(marker["identities_ok"])
        seconds.update(marker["seconds"])
        nodes[marker["node_id"]] += 1
    return {
        "inputs": sum(m["inputs"] for m in markers),
        "rows": dict(rows),
        "status": {k: dict(v) for k, v in sorted(status.items())},
        "mask_types": {k: dict(v) for k, v in sorted(mask_types.items())},
        "align_methods": dict(methods),
        "identities_ok": dict(sorted(identities.items())),
        "stage_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "shards_per_node": dict(nodes),
    }


def check_complete(index: DatasetIndex, totals: dict) -> list[str]:
    """Images in = rows out: every indexed image has exactly one unmasked row (ok or failed)."""
    problems = []
    unmasked_rows = totals["rows"].get(UNMASKED, 0)
    if totals["inputs"] != index.num_images:
        problems.append(f"shards cover {totals['inputs']} inputs, index has {index.num_images}")
    if unmasked_rows != index.num_images:
        problems.append(f"{unmasked_rows} unmasked rows for {index.num_images} input images")
    return problems


def build_card(cfg: PrepareConfig, index: DatasetIndex, totals: dict) -> dict:
    return {
        "name": cfg.name,
        "output_uri": cfg.output.uri,
        "input_uri": cfg.index.uri,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_images": index.num_images,
        "num_identities": len(index.identities),
        "unlabelled_skipped": index.unlabelled,
        "num_shards": len(index.shard_sizes),
        "variants": [UNMASKED] + [v.name for v in cfg.variants],
        "fallback_crops": totals["status"].get(UNMASKED, {}).get("ok_fallback", 0),
        "counts": totals,
        "config": dump_config(cfg),
        "fingerprint": index.fingerprint,
        "code_version": code_version(),
    }


def card_markdown(card: dict) -> str:
    counts = card["counts"]
    lines = [
        f"# Dataset card: {card['name']}",
        "",
        f"- input: `{card['input_uri']}`; output: `{card['output_uri']}`",
        (
            f"- {card['num_images']} images of {card['num_identities']} identities in {card['num_shards']} shards"
            f" ({card['unlabelled_skipped']} files outside an identity folder skipped)"
        ),
        f"- crop {card['config']['align']['crop']}, format {card['config']['output']['image_format']}",
        (
            f"- {card['fallback_crops']} fallback crops (status ok_fallback: no face found, a guessed box; "
            "left out of training unless data.keep_fallback=true)"
        ),
        f"- code: mfr-ray {card['code_version']['package']} commit {card['code_version']['git_commit']}",
        f"- created {card['created_at']}",
        "",
        "| variant | rows | " + " | ".join(f"status {s}" for s in _statuses(counts)) + " |",
        "|---|---|" + "---|" * len(_statuses(counts)),
    ]
    for variant in card["variants"]:
        by_status = counts["status"].get(variant, {})
        cells = " | ".join(str(by_status.get(s, 0)) for s in _statuses(counts))
        lines.append(f"| {variant} | {counts['rows'].get(variant, 0)} | {cells} |")
    lines += [
        "",
        f"Mask types: {json_inline(counts['mask_types'])}",
        "",
        f"Alignment methods: {json_inline(counts['align_methods'])}",
        "",
    ]
    return "\n".join(lines)


def _statuses(counts: dict) -> list[str]:
    return sorted({s for by_status in counts["status"].values() for s in by_status})


def json_inline(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items()) or "none"


def write_card(layout: DatasetLayout, card: dict) -> None:
    layout.write_json(layout.path(CARD_JSON), card)
    layout.write_text(layout.path(CARD_MD), card_markdown(card))
