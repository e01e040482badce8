"""Per-search operating points (FRVT 1:N style) calibrated against the gallery the service actually holds.

A search compares a probe with every enrolled identity, so a per-comparison FAR does not bound how often a
stranger is answered "match": that rate (the false-positive identification rate, FPIR) grows with the
gallery. A package therefore carries `search_calibration.npz`: the embeddings of faces of people nobody
will enrol (CelebA-299 by default, each photo bare and masked with masks training never drew,
`masking.held_out`), detected and aligned as the service does, with their mask probabilities. The threshold
at a per-search FPIR is the (1 - FPIR) quantile of their best scores against the current gallery,
recomputed whenever the gallery changes - so it holds for the gallery's real size and content (synthetic
templates included) - separately for faces the mask-presence classifier calls masked and bare; an unsure
probe takes the stricter of the two. Nothing is unpickled: the file is plain arrays.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfr_ray.evaluation.analyses.open_set import fpir_threshold
from mfr_ray.masking.presence import masked_states
from mfr_ray.serve.package import PACKAGE_JSON, OperatingPoint, PackageError

SEARCH_CALIBRATION_FILE = "search_calibration.npz"
STATE_NAMES = {False: "bare", True: "masked"}


class SearchCalibrationError(PackageError):
    """A package without search calibration was asked for a per-search rate."""


def no_calibration_error(package) -> SearchCalibrationError:
    """What a per-search rate asked of a package without calibration faces answers: the one wording for
    `SearchCalibration.of` and the gallery keeper (which loads the faces once and reports this per request)."""
    return SearchCalibrationError(f"package {package.package_id} has no search calibration: no per-search rate "
                                  "(fpir) can be promised; re-export with --search-calibration FOLDER")


@dataclass(frozen=True)
class SearchCalibration:
    """Never-enrolled faces as the service would embed them: (n, d) L2-normalised embeddings, each one's
    mask probability and how its photo was masked (`unmasked`, `n95_held_out`, `occluder`)."""

    embeddings: np.ndarray
    mask_probability: np.ndarray
    kinds: np.ndarray
    calibration_set: str

    @classmethod
    def of(cls, package) -> SearchCalibration:
        """The package's calibration faces, or a SearchCalibrationError naming what to do."""
        found = cls.load(package.folder)
        if found is None:
            raise no_calibration_error(package)
        return found

    @classmethod
    def load(cls, folder: str | Path) -> SearchCalibration | None:
        """The package's calibration faces, or None for a package exported without them."""
        path = Path(folder) / SEARCH_CALIBRATION_FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["embedding"].astype(np.float32), saved["mask_probability"].astype(np.float64),
                       saved["kind"].astype(str), str(saved["calibration_set"]))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SEARCH_CALIBRATION_FILE
        np.savez(path, embedding=self.embeddings.astype(np.float32), mask_probability=self.mask_probability,
                 kind=self.kinds.astype(str), calibration_set=np.array(self.calibration_set))
        return path

    def in_state(self, masked: bool) -> np.ndarray:
        return in_state(self.mask_probability, masked)

    def points(self, best_scores: np.ndarray, fpir: float, identities: int) -> dict[bool, OperatingPoint]:
        """The threshold at per-search `fpir` for masked and for bare probes, from each calibration face's
        best score against a gallery of `identities` people."""
        return state_points(best_scores, self.mask_probability, fpir, self.calibration_set, identities)


def in_state(probabilities: np.ndarray, masked: bool) -> np.ndarray:
    """Which faces a probe judged `masked` (or bare) is compared with: those the classifier could call the
    same (an unsure face, or one without a probability (NaN), counts in both)."""
    return np.array([masked in masked_states(None if np.isnan(p) else p) for p in probabilities], dtype=bool)


def state_points(best_scores: np.ndarray, probabilities: np.ndarray, fpir: float, calibration_set: str,
                 identities: int) -> dict[bool, OperatingPoint]:
    """The threshold at per-search `fpir` for masked and for bare probes from never-enrolled faces' best
    scores against a gallery of `identities` people, each face in the state(s) its mask probability allows."""
    points = {}
    for masked in (False, True):
        chosen = in_state(np.asarray(probabilities, dtype=np.float64), masked)
        points[masked] = search_point(np.asarray(best_scores)[chosen], fpir, f"{calibration_set}: {int(chosen.sum())} "
                                      f"never-enrolled {STATE_NAMES[masked]} faces, gallery of {identities} identities")
    return points


def search_point(best_scores: np.ndarray, fpir: float, calibration_set: str) -> OperatingPoint:
    """The threshold at per-search `fpir` from never-enrolled faces' best gallery scores: at most that share
    of them reaches it. `resolvable` is False when there are too few faces to measure the rate (1 / n > fpir):
    the threshold then only says that none of them was accepted. `far_target` holds the FPIR."""
    scores = np.asarray(best_scores, dtype=np.float64)
    threshold = fpir_threshold(scores, fpir) if len(scores) else 1.0
    accepted = int((scores >= threshold).sum())
    return OperatingPoint(far_target=float(fpir), threshold=float(threshold), far=accepted / max(len(scores), 1),
                          tpr=float("nan"), false_accepts=accepted, n_impostor=len(scores), n_genuine=0,
                          resolvable=bool(len(scores) and 1.0 / len(scores) <= fpir), calibration_set=calibration_set)


def decision_point(points: dict[bool, OperatingPoint], probability: float | None) -> tuple[OperatingPoint, str]:
    """The point a probe with this mask probability is decided at: its state's, the stricter of both when
    the classifier is unsure. Returns the point and the state's name (`masked`, `bare`, `unsure`)."""
    states = masked_states(probability)
    point = max((points[s] for s in states), key=lambda p: p.threshold)
    return point, STATE_NAMES[next(iter(states))] if len(states) == 1 else "unsure"


# -- making one (mfr export --search-calibration) --------------------------------------------------------
def calibration_photos(root: str | Path, per_identity: int, max_identities: int | None = None) -> list[str]:
    """The first `per_identity` photos of each `<identity>/` folder under `root` (sorted, so runs agree)."""
    folders = sorted(d for d in Path(root).iterdir() if d.is_dir())[:max_identities]
    suffixes = (".jpg", ".jpeg", ".png")
    return [str(f) for d in folders for f in sorted(p for p in d.iterdir() if p.suffix.lower() in suffixes)[:per_identity]]


def build_search_calibration(package, root: str | Path, per_identity: int = 1, max_identities: int | None = None,
                             seed: int = 0, batch: int = 32) -> SearchCalibration:
    """Embed every calibration photo bare and masked (held-out N95 or occluder, `masking.held_out`) through
    the package's own detect -> align -> embed path; faces it finds are kept (a photo without one would be
    refused by the service too)."""
    from mfr_ray.masking.held_out import MASK_FAILED, UNMASKED, mask_photo, masked_kind

    photos = calibration_photos(root, per_identity, max_identities)
    files, kinds = [], []
    with tempfile.TemporaryDirectory(prefix="mfr-search-calibration-") as tmp:
        for i, photo in enumerate(photos):
            masked = str(Path(tmp) / f"{i}.jpg")
            drawn = mask_photo(photo, masked_kind(photo), masked, seed)
            files += [photo] + ([masked] if drawn != MASK_FAILED else [])
            kinds += [UNMASKED] + ([drawn] if drawn != MASK_FAILED else [])
        results = [r for i in range(0, len(files), batch)
                   for r in package.embed_images([Path(f).read_bytes() for f in files[i : i + batch]])]
    kept = [i for i, r in enumerate(results) if r.ok]
    name = f"{Path(root).name} ({len(photos)} photos, each bare and masked with held-out masks)"
    return SearchCalibration(np.stack([results[i].embedding for i in kept]).astype(np.float32),
                             np.array([results[i].mask_probability for i in kept], dtype=np.float64),
                             np.array([kinds[i] for i in kept]), name)


def add_search_calibration(package_folder: str | Path, root: str | Path, per_identity: int = 1,
                           max_identities: int | None = None, seed: int = 0) -> SearchCalibration:
    """Write the calibration faces into the package and say so in `package.json` (its model card lists
    them); the package id is unchanged (weights and preprocessing are)."""
    from mfr_ray.serve.card import SEARCH_CARD_HEADING, search_card
    from mfr_ray.serve.package import MODEL_CARD, load_package

    package = load_package(str(package_folder))
    calibration = build_search_calibration(package, root, per_identity, max_identities, seed)
    calibration.save(package_folder)
    spec_path = Path(package_folder) / PACKAGE_JSON
    spec = json.loads(spec_path.read_text())
    spec["search_calibration"] = summary(calibration)
    spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True))
    card = Path(package_folder) / MODEL_CARD
    kept = card.read_text().split("\n" + SEARCH_CARD_HEADING)[0].rstrip("\n") if card.is_file() else ""
    card.write_text("\n".join([kept, *search_card(spec)]) + "\n")
    return calibration


def summary(calibration: SearchCalibration) -> dict:
    """What `package.json` and the model card say of the calibration faces."""
    kinds, counts = np.unique(calibration.kinds, return_counts=True)
    return {"file": SEARCH_CALIBRATION_FILE, "calibration_set": calibration.calibration_set,
            "faces": len(calibration.embeddings), "faces_by_mask": dict(zip(kinds.tolist(), counts.tolist())),
            "masked": int(calibration.in_state(True).sum()), "bare": int(calibration.in_state(False).sum()),
            "rule": "threshold at per-search FPIR = (1 - FPIR) quantile of these faces' best scores against the "
                    "live gallery, recomputed when it changes; masked and bare probes separately, unsure: stricter"}


def points_as_dict(points: dict[bool, OperatingPoint]) -> dict[str, dict]:
    return {STATE_NAMES[s]: dataclasses.asdict(p) for s, p in points.items()}


def points_from_dict(data: dict[str, dict]) -> dict[bool, OperatingPoint]:
    return {s: OperatingPoint(**data[name]) for s, name in STATE_NAMES.items()}


def gallery_points(calibration: SearchCalibration, gallery, fpir: float) -> tuple[dict[bool, OperatingPoint], int]:
    """Per-search thresholds at `fpir` against `gallery` as it is now, from every calibration face's exact
    best score (an approximate index could miss its best template and promise too much). Returns the points
    and the number of identities they hold for."""
    state = gallery.state
    best = best_scores(calibration.embeddings, gallery.template_matrix(state))
    identities = len(set(state.templates.column("identity").to_pylist()))
    return calibration.points(best, fpir, identities), identities


def best_scores(queries: np.ndarray, templates: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Each query's highest cosine score over the (n, d) templates (-1 for an empty gallery), a chunk of
    templates at a time so a large gallery needs little extra memory."""
    best = np.full(len(queries), -1.0, dtype=np.float32)
    for start in range(0, len(templates), chunk):
        best = np.maximum(best, (queries @ templates[start : start + chunk].T).max(axis=1))
    return best
