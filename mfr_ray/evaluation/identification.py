"""Closed-set identification (one gallery image per identity, rank-k) and open-set identification
with a reject threshold (FNIR at fixed FPIR), on L2-normalised embeddings. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfr_ray.evaluation.metric_names import fpir_tag
from mfr_ray.evaluation.verification import far_threshold, l2_normalize


@dataclass
class GallerySplit:
    gallery: np.ndarray  # row indices into the embedding array
    probes: np.ndarray


def first_image_gallery(labels: np.ndarray, identities: np.ndarray | None = None) -> GallerySplit:
    """The first image of each identity (in array order) is its gallery image; the rest are probes.
    `identities` restricts the gallery to those identities (others are neither gallery nor probes)."""
    labels = np.asarray(labels)
    keep = np.ones(len(labels), bool) if identities is None else np.isin(labels, identities)
    _, first = np.unique(labels, return_index=True)
    gallery = np.sort(first[keep[first]])
    is_gallery = np.zeros(len(labels), bool)
    is_gallery[gallery] = True
    return GallerySplit(gallery, np.flatnonzero(keep & ~is_gallery))


def rank_of_true_match(similarity: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """1-based rank of the probe's own identity among the gallery (ties counted pessimistically)."""
    true_col = np.array([np.flatnonzero(gallery_labels == label)[0] for label in probe_labels])
    true_score = similarity[np.arange(len(probe_labels)), true_col]
    return (similarity >= true_score[:, None]).sum(1)


def closed_set_identification(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ranks: tuple[int, ...] = (1, 5),
    probe_embeddings: np.ndarray | None = None,
) -> dict[str, float]:
    """Rank-k identification rates with one gallery image per identity; identities with a single image
    stay in the gallery as distractors. `probe_embeddings` (same rows, another variant, e.g. masked)
    replaces the probes' embeddings: unmasked gallery, masked probes."""
    x = l2_normalize(embeddings)
    probe_x = x if probe_embeddings is None else l2_normalize(probe_embeddings)
    labels = np.asarray(labels)
    split = first_image_gallery(labels)
    if len(split.probes) == 0:
        return {f"rank{k}": float("nan") for k in ranks} | {"n_probes": 0, "n_gallery": len(split.gallery)}
    similarity = probe_x[split.probes] @ x[split.gallery].T
    rank = rank_of_true_match(similarity, labels[split.probes], labels[split.gallery])
    out = {f"rank{k}": float((rank <= k).mean()) for k in ranks}
    return out | {"n_probes": len(split.probes), "n_gallery": len(split.gallery)}


def fpir_threshold(top_non_mated: np.ndarray, target_fpir: float) -> float:
    """Reject threshold at a per-search FPIR: the smallest similarity that at most floor(target * n) of the
    non-mated probes' best gallery scores reach (the (1 - FPIR) quantile, ties never leaking through)."""
    return far_threshold(top_non_mated, target_fpir)


def split_known_unknown(labels: np.ndarray, unknown_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Identities with >= 2 images, sorted, split deterministically: every k-th one is unknown
    (not enrolled), so the unknown share is close to `unknown_fraction`."""
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    multi = names[counts >= 2]
    step = max(round(1.0 / unknown_fraction), 1) if unknown_fraction > 0 else 0
    unknown_mask = np.zeros(len(multi), bool)
    if step:
        unknown_mask[step - 1 :: step] = True
    return multi[~unknown_mask], multi[unknown_mask]


def open_set_identification(
    embeddings: np.ndarray,
    labels: np.ndarray,
    fpir_targets: tuple[float, ...] = (0.01, 0.1),
    unknown_fraction: float = 0.5,
) -> dict[str, float]:
    """Open-set protocol: known identities enrol their first image; their other images are mated probes,
    every image of an unknown identity is a non-mated probe. At reject threshold t a probe's answer is
    the top gallery match if its similarity >= t, else "unknown".
    FPIR(t) = non-mated probes answered with someone; FNIR(t) = mated probes not answered with the
    right identity. t is the smallest similarity meeting each FPIR target. The confidence reported
    per probe is its top-1 similarity minus the second best (how clearly the answer wins)."""
    x = l2_normalize(embeddings)
    labels = np.asarray(labels)
    known, unknown = split_known_unknown(labels, unknown_fraction)
    split = first_image_gallery(labels, known)
    mated = split.probes
    non_mated = np.flatnonzero(np.isin(labels, unknown))
    if len(split.gallery) < 2 or len(mated) == 0 or len(non_mated) == 0:
        return {"n_mated": len(mated), "n_non_mated": len(non_mated)}
    gallery_labels = labels[split.gallery]
    sim_mated = x[mated] @ x[split.gallery].T
    sim_non = x[non_mated] @ x[split.gallery].T
    top_mated = sim_mated.max(1)
    correct = gallery_labels[sim_mated.argmax(1)] == labels[mated]
    top_non = sim_non.max(1)
    out: dict[str, float] = {"n_mated": len(mated), "n_non_mated": len(non_mated),
                             "n_enrolled": len(split.gallery)}
    for target in fpir_targets:
        t = fpir_threshold(top_non, target)
        tag = fpir_tag(target)
        out[f"threshold_at_{tag}"] = t
        out[f"fpir_at_{tag}"] = float((top_non >= t).mean())
        out[f"fnir_at_{tag}"] = float(1.0 - (correct & (top_mated >= t)).mean())
    both = np.sort(np.concatenate([sim_mated, sim_non]), axis=1)
    margin = both[:, -1] - both[:, -2]
    out["confidence_mated_mean"] = float(margin[: len(mated)].mean())
    out["confidence_non_mated_mean"] = float(margin[len(mated) :].mean())
    return out
