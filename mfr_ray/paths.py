"""Where shared data and bundled model files live, resolved through settings rather than constants."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SHARED_ENV = "MFR_SHARED_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The shared datasets/weights folder: $MFR_SHARED_DIR, else `../shared` beside the working folder
    or beside the project checkout."""
    if os.environ.get(SHARED_ENV):
        return Path(os.environ[SHARED_ENV]).expanduser().resolve()
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / ".." / "shared").resolve()
        if candidate.is_dir():
            return candidate
    return (Path.cwd() / ".." / "shared").resolve()


def expand_shared(path: str) -> str:
    """Replace a leading `${shared}` in a config path with the shared folder."""
    return path.replace("${shared}", str(shared_dir()))


def face_models_dir() -> Path:
    """Folder of the dlib model files shipped by `face-recognition-models`, found without importing the
    package (its __init__ needs pkg_resources, which recent setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("face-recognition-models is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def face_model_file(name: str) -> Path:
    """Path of one dlib model, e.g. `shape_predictor_68_face_landmarks.dat`."""
    path = face_models_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"dlib model {name} not found in {path.parent}")
    return path
