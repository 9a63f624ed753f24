"""Per-stream engine state in a local checkpoint file, so a restarted worker continues warm.

A checkpoint is one safetensors file (no pickle) with four tensors: the rows of the engine's
float32 and float64 slabs, and the stream ids as UTF-8 bytes (`ids`, uint8) cut by `offsets`
(int64, S + 1 boundaries), so an id may hold any character. Its metadata names the format, the
sha256 of the model weights the state was computed with, the engine's row width, when it was
saved, and anything the caller adds (the worker records its committed offsets). Writes are
atomic: a temporary file in the same directory, fsynced, then `os.replace`.

Loading refuses, with a SnapshotError that says why, a missing or corrupt file, another format,
or state taken with a different model (hash) or layout (row width): hidden states of one model
mean nothing to another.

>>> import tempfile, pathlib, torch
>>> from detector.engine import CLOCKS, Engine
>>> from detector.model import Forecaster, ForecasterConfig
>>> engine = Engine(Forecaster(ForecasterConfig(n_features=1, hidden_size=4)))
>>> engine.restore(Snapshot(["pump-1", "ünï/çødé"], torch.ones(2, engine.width32),
...                         torch.zeros(2, CLOCKS, dtype=torch.float64)))
>>> path = pathlib.Path(tempfile.mkdtemp()) / "state.safetensors"
>>> save_snapshot(path, engine.snapshot(), model_sha256="abc", extra={"note": "doc"}).streams
2
>>> loaded = load_snapshot(path, model_sha256="abc", width32=engine.width32)
>>> loaded.snapshot.streams, loaded.metadata["note"]
(['pump-1', 'ünï/çødé'], 'doc')
>>> load_snapshot(path, model_sha256="def", width32=engine.width32)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
detector.errors.SnapshotError: ...: taken with model sha256 abc..., the loaded model is def...
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from detector.engine import CLOCKS, Engine, Snapshot
from detector.errors import SnapshotError

FORMAT = "1"
FILENAME = "state.safetensors"
_TENSORS = ("rows32", "rows64", "ids", "offsets")


@dataclass
class SavedSnapshot:
    path: Path
    streams: int
    bytes: int
    seconds: float


@dataclass
class LoadedSnapshot:
    snapshot: Snapshot
    metadata: dict[str, str]


def model_hash(manifest: Mapping[str, Any]) -> str:
    """The sha256 of an artifact's weights, from its manifest ('' when it has none)."""
    try:
        return str(manifest["weights"]["sha256"])
    except (KeyError, TypeError):
        return ""


def encode_ids(streams: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream ids -> (uint8 UTF-8 bytes, int64 boundaries).

    >>> ids, offsets = encode_ids(["a", "bé"])
    >>> ids.tolist(), offsets.tolist()
    ([97, 98, 195, 169], [0, 1, 4])
    >>> decode_ids(ids, offsets)
    ['a', 'bé']
    """
    encoded = [s.encode("utf-8", "surrogatepass") for s in streams]
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
    offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    blob = b"".join(encoded)
    ids = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())
    return ids, offsets


def decode_ids(ids: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    blob = ids.numpy().tobytes()
    bounds = offsets.tolist()
    return [
        blob[bounds[i] : bounds[i + 1]].decode("utf-8", "surrogatepass")
        for i in range(len(bounds) - 1)
    ]


def save_snapshot(
    path: str | os.PathLike[str],
    snapshot: Snapshot,
    *,
    model_sha256: str,
    extra: Mapping[str, str] | None = None,
) -> SavedSnapshot:
    """Write a snapshot atomically; returns what was written."""
    started = time.perf_counter()
    path = Path(path)
    ids, offsets = encode_ids(snapshot.streams)
    metadata = {
        **{str(k): str(v) for k, v in (extra or {}).items()},
        "format": FORMAT,
        "model_sha256": model_sha256,
        "width32": str(int(snapshot.rows32.shape[1]) if snapshot.rows32.ndim == 2 else 0),
        "streams": str(len(snapshot.streams)),
        "saved_at": f"{time.time():.3f}",
    }
    data = save_bytes(
        {
            "rows32": snapshot.rows32.contiguous().to(torch.float32),
            "rows64": snapshot.rows64.contiguous().to(torch.float64),
            "ids": ids,
            "offsets": offsets,
        },
        metadata=metadata,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return SavedSnapshot(path, len(snapshot.streams), len(data), time.perf_counter() - started)


def load_snapshot(
    path: str | os.PathLike[str], *, model_sha256: str, width32: int
) -> LoadedSnapshot:
    """Read and check a snapshot; raises SnapshotError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            missing = [name for name in _TENSORS if name not in handle.keys()]
            if missing:
                raise SnapshotError(f"{path}: not a state checkpoint (no {', '.join(missing)})")
            tensors = {name: handle.get_tensor(name) for name in _TENSORS}
    except SnapshotError:
        raise
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise SnapshotError(f"{path}: corrupt checkpoint ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise SnapshotError(
            f"{path}: checkpoint format {metadata.get('format')!r}, this version reads {FORMAT}"
        )
    saved_hash = metadata.get("model_sha256", "")
    if saved_hash != model_sha256:
        raise SnapshotError(
            f"{path}: taken with model sha256 {saved_hash[:12]}..., the loaded model is "
            f"{model_sha256[:12]}...; the model differs, so its state cannot be reused"
        )
    rows32, rows64 = tensors["rows32"], tensors["rows64"]
    ids, offsets = tensors["ids"], tensors["offsets"]
    streams = len(offsets) - 1
    if rows32.ndim != 2 or rows32.shape[1] != width32:
        raise SnapshotError(
            f"{path}: rows hold {tuple(rows32.shape[1:])} floats, this engine's {width32}: "
            f"taken with another model layout"
        )
    if (
        streams < 0
        or rows32.shape[0] != streams
        or tuple(rows64.shape) != (streams, CLOCKS)
        or rows32.dtype != torch.float32
        or rows64.dtype != torch.float64
        or ids.dtype != torch.uint8
        or (streams >= 0 and len(offsets) and int(offsets[-1]) != len(ids))
    ):
        raise SnapshotError(f"{path}: corrupt checkpoint (tensor shapes do not agree)")
    try:
        names = decode_ids(ids, offsets)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SnapshotError(f"{path}: corrupt checkpoint (stream ids: {exc})") from exc
    if len(set(names)) != len(names):
        raise SnapshotError(f"{path}: corrupt checkpoint (a stream id appears twice)")
    return LoadedSnapshot(Snapshot(names, rows32, rows64), metadata)


def save_engine(
    path: str | os.PathLike[str],
    engine: Engine,
    *,
    model_sha256: str,
    streams: Iterable[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> SavedSnapshot:
    """Checkpoint the given streams of an engine (default: all of them)."""
    return save_snapshot(path, engine.snapshot(streams), model_sha256=model_sha256, extra=extra)


def restore_engine(
    path: str | os.PathLike[str],
    engine: Engine,
    *,
    model_sha256: str,
    streams: Iterable[str] | None = None,
    skip_held: bool = False,
) -> LoadedSnapshot:
    """Load a checkpoint into an engine: all its streams, or only those in `streams`.

    With `skip_held`, streams the engine already holds keep their (newer) live state.
    """
    loaded = load_snapshot(path, model_sha256=model_sha256, width32=engine.width32)
    snap = loaded.snapshot
    if streams is not None or skip_held:
        wanted = None if streams is None else set(streams)
        held_set = set(engine.snapshot(snap.streams).streams) if skip_held else set()
        rows = [
            i
            for i, name in enumerate(snap.streams)
            if (wanted is None or name in wanted) and name not in held_set
        ]
        index = torch.tensor(rows, dtype=torch.int64)
        snap = Snapshot([snap.streams[i] for i in rows], snap.rows32[index], snap.rows64[index])
    try:
        engine.restore(snap)
    except ValueError as exc:
        raise SnapshotError(f"{path}: {exc}") from exc
    return LoadedSnapshot(snap, loaded.metadata)
