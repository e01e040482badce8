"""Is this aligned face masked? A linear classifier on the crop's lower face, so a service can judge a
masked probe by a threshold calibrated on masked comparisons.

Features are the network-independent look of the lower face: HOG of the grey lower region (a mask has
few gradients where a mouth and a chin have many) and the colour of the lower region against the upper
one (a mask is not skin-coloured). The weights are plain numbers in JSON (no pickle), shipped in
`assets/mask_presence.json` and retrained with `python -m mfr_ray.masking.presence_training`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PRESENCE_FILE = Path(__file__).parent / "assets" / "mask_presence.json"
PRESENCE_FORMAT = "mfr-ray/mask-presence/1"
LOWER_FROM = 0.46  # the lower face starts here, as a fraction of the crop's height (just above the nose tip)
LOWER_SIZE = (48, 32)  # (width, height) the lower region is resized to before HOG
CELL, BINS = 8, 9  # HOG cells of 8x8 pixels, 9 unsigned orientations, blocks of 2x2 cells
MASKED_FROM, BARE_UNTIL = 0.7, 0.3  # mask probability: masked at or above, bare at or below, else unsure


def masked_states(probability: float | None) -> set[bool]:
    """Whether a face with this mask probability is masked: {True}, {False}, or both when the classifier is
    unsure (or gave no probability): a decision then holds for either."""
    if probability is None:
        return {False, True}
    return {True} if probability >= MASKED_FROM else {False} if probability <= BARE_UNTIL else {False, True}


def presence_features(crops: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB aligned crops (any layout) -> (n, d) float32 features."""
    return np.stack([_features_of(crop) for crop in crops]).astype(np.float32) if len(crops) else \
        np.zeros((0, feature_size()), np.float32)


def feature_size() -> int:
    cells_y, cells_x = LOWER_SIZE[1] // CELL, LOWER_SIZE[0] // CELL
    return (cells_y - 1) * (cells_x - 1) * 4 * BINS + 12


def hog(grey: np.ndarray) -> np.ndarray:
    """Histograms of oriented gradients (Dalal-Triggs: 8x8 cells, 9 unsigned bins, L2-normalised 2x2
    blocks) of a grey image whose sides are multiples of CELL."""
    grey = grey.astype(np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=1), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=1)
    magnitude, angle = np.hypot(gx, gy), np.rad2deg(np.arctan2(gy, gx)) % 180.0
    bins = np.minimum((angle / (180.0 / BINS)).astype(int), BINS - 1)
    cells_y, cells_x = grey.shape[0] // CELL, grey.shape[1] // CELL
    cell = (np.arange(grey.shape[0]) // CELL)[:, None] * cells_x + (np.arange(grey.shape[1]) // CELL)[None, :]
    hist = np.zeros(cells_y * cells_x * BINS, np.float32)
    np.add.at(hist, (cell * BINS + bins).ravel(), magnitude.ravel())
    hist = hist.reshape(cells_y, cells_x, BINS)
    blocks = [hist[y : y + 2, x : x + 2].ravel() for y in range(cells_y - 1) for x in range(cells_x - 1)]
    return np.concatenate([b / np.sqrt((b**2).sum() + 1e-6) for b in blocks])


def _features_of(crop: np.ndarray) -> np.ndarray:
    split = round(LOWER_FROM * crop.shape[0])
    lower, upper = crop[split:], crop[:split]
    grey = cv2.cvtColor(np.ascontiguousarray(lower), cv2.COLOR_RGB2GRAY)
    hog_features = hog(cv2.resize(grey, LOWER_SIZE, interpolation=cv2.INTER_AREA))
    colour = []
    for part in (lower, upper):
        hsv = cv2.cvtColor(np.ascontiguousarray(part), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float32)
        colour += [*(hsv.mean(axis=0) / 255.0), *(hsv.std(axis=0) / 255.0)]
    return np.concatenate([hog_features, np.asarray(colour, np.float32)])


@dataclass(frozen=True)
class MaskPresence:
    """Standardised features -> logistic probability that the face is masked (or its lower half covered)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    trained_on: str = ""

    def probability(self, crops: np.ndarray) -> np.ndarray:
        """(n,) probabilities in [0, 1] for (n, H, W, 3) aligned crops."""
        logits = ((presence_features(crops) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))

    def to_json(self) -> dict:
        return {"format": PRESENCE_FORMAT, "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept, "trained_on": self.trained_on,
                "lower_from": LOWER_FROM, "lower_size": list(LOWER_SIZE)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path | None = None) -> MaskPresence:
        data = json.loads(Path(path or PRESENCE_FILE).read_text())
        if data.get("format") != PRESENCE_FORMAT or data.get("lower_size") != list(LOWER_SIZE):
            raise ValueError(f"{path or PRESENCE_FILE}: not a {PRESENCE_FORMAT} file for these features")
        arrays = {k: np.asarray(data[k], np.float32) for k in ("mean", "scale", "coef")}
        return cls(**arrays, intercept=float(data["intercept"]), trained_on=data.get("trained_on", ""))


def fit_presence(crops: np.ndarray, masked: np.ndarray, trained_on: str, c: float = 0.05) -> MaskPresence:
    """A classifier fitted on aligned crops labelled masked (True) or bare (False)."""
    from sklearn.linear_model import LogisticRegression

    features = presence_features(crops)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=2000).fit((features - mean) / scale, masked.astype(int))
    return MaskPresence(mean, scale, model.coef_[0].astype(np.float32), float(model.intercept_[0]), trained_on)
