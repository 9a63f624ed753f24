"""Model artifacts: a directory with `model.safetensors` (no pickle) and `manifest.json`.

The manifest holds what is needed to rebuild and trust the model: the features and attrs in input
order, the forecaster's arguments (as nanoGPT's `model_args`), the transforms, the calibration
statistics of scores on validation data, training metrics, the package version and the sha256 of
the weights. Loading checks the hash and the format and refuses anything else with ArtifactError.

>>> import tempfile
>>> from detector.model import Forecaster, ForecasterConfig
>>> model = Forecaster(ForecasterConfig(n_features=1, hidden_size=4))
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = save_artifact(tmp, model, features=["value"], version="doc")
...     loaded = load_artifact(path)
>>> loaded.features, loaded.version, loaded.model.config.hidden_size
(['value'], 'doc', 4)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from detector import __version__
from detector.errors import ArtifactError
from detector.model import Forecaster, ForecasterConfig
from detector.normalization import Z_CLIP
from detector.scoring import Calibration

FORMAT = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


@dataclass
class Artifact:
    model: Forecaster
    features: list[str]
    attrs: list[str] = field(default_factory=list)
    calibration: Calibration = field(default_factory=Calibration)
    version: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(
    directory: str | Path,
    model: Forecaster,
    *,
    features: list[str],
    attrs: list[str] | None = None,
    calibration: Calibration | None = None,
    version: str,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write weights then manifest (the manifest last: its presence marks a complete artifact)."""
    attrs = attrs or []
    if model.config.n_features != len(features) or model.config.n_attrs != len(attrs):
        raise ArtifactError(
            f"the model takes {model.config.n_features} features and {model.config.n_attrs} attrs,"
            f" but {len(features)} features and {len(attrs)} attrs were named"
        )
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    weights = path / WEIGHTS
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(weights))
    manifest = {
        "format": FORMAT,
        "version": version,
        "package_version": __version__,
        "features": list(features),
        "attrs": list(attrs),
        "model": model.config.to_dict(),
        "transforms": {"normalization": "online-ewm", "z_clip": Z_CLIP},
        "calibration": (calibration or Calibration()).to_dict(),
        "training": training or {},
        "metrics": metrics or {},
        "weights": {"file": WEIGHTS, "sha256": _sha256(weights)},
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def load_artifact(directory: str | Path) -> Artifact:
    """Load and verify an artifact; every failure is one ArtifactError that says what and where."""
    path = Path(directory)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not a model artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ArtifactError(
                f"{manifest_path}: format {manifest.get('format')!r}, this version reads {FORMAT}"
            )
        weights = path / manifest["weights"]["file"]
        expected_hash = manifest["weights"]["sha256"]
        features = list(manifest["features"])
        attrs = list(manifest.get("attrs", []))
        config = ForecasterConfig(**manifest["model"])
        calibration = Calibration.from_dict(manifest["calibration"])
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{manifest_path}: malformed manifest ({exc!r})") from exc
    if weights.parent.resolve() != path.resolve() or not weights.is_file():
        raise ArtifactError(f"{path}: weights file {weights.name!r} is missing")
    actual_hash = _sha256(weights)
    if actual_hash != expected_hash:
        raise ArtifactError(
            f"{weights}: sha256 {actual_hash[:12]}… does not match the manifest's "
            f"{str(expected_hash)[:12]}…; the weights were changed or corrupted"
        )
    if config.n_features != len(features) or config.n_attrs != len(attrs):
        raise ArtifactError(f"{manifest_path}: feature list does not match the model's inputs")
    model = Forecaster(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # safetensors and torch raise several types for bad files
        raise ArtifactError(f"{weights}: cannot load weights ({exc})") from exc
    return Artifact(
        model=model.eval(),
        features=features,
        attrs=attrs,
        calibration=calibration,
        version=str(manifest.get("version", "")),
        manifest=manifest,
        path=path,
    )
