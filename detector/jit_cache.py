"""numba's on-disk cache of the compiled kernels, kept in step with all of their sources.

numba files a cached function under its own source file's timestamp only. A kernel that calls
or inlines functions of other modules (the scorer reads `normalization`, the small waves' one
call runs the scorer's and the GRU's passes) goes on loading the code those modules had when it
was compiled: after an edit to `scoring.py`, big waves ran the new scorer and small waves the
old one until `__pycache__` was cleared by hand. So the package's cache is kept whole: the
modules whose kernels reach into others call `keep_current()` when they are imported (before any
kernel is loaded, which numba does at its first call), and if any compiled module's source
differs from the sources the cache was filled from, every cached kernel of the package is
dropped, to be compiled again once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numba

# The modules that compile kernels with cache=True (a test keeps this list complete).
COMPILED = (
    "engine", "fused_gru", "fused_head", "fused_wave", "normalization", "prefetch", "scoring",
    "slots",
)  # fmt: skip
STAMP = "detector-sources.sha256"  # the sources' digest, beside the cache files

_checked = False


def drop_if_stale(directory: Path, sources: Sequence[Path]) -> bool:
    """Remove the cache files of the `sources` modules from `directory` unless they were
    compiled from the sources as they are now, and record the sources' digest there. Returns
    whether anything was stale. A cache that cannot be written is left as it is (numba keeps
    it elsewhere then)."""
    digest = hashlib.sha256()
    for path in sorted(sources):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    stamp = directory / STAMP
    try:
        if stamp.read_text() == digest.hexdigest():
            return False
    except OSError:
        pass  # no stamp yet: whatever is there was compiled from unknown sources
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in sources:
            for cached in directory.glob(f"{path.stem}.*.nb[ic]"):
                cached.unlink(missing_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:
        pass
    return True


@numba.njit(cache=True)
def _probe() -> int:  # never called: its cache locator names the package's cache directory
    return 0


def keep_current() -> None:
    """Drop the package's cached kernels if any compiled module changed; once per process."""
    global _checked
    if _checked:
        return
    _checked = True
    package = Path(__file__).parent
    # numba's own choice of directory (NUMBA_CACHE_DIR included), from its private cache object
    directory = Path(_probe._cache._cache_path)  # type: ignore[attr-defined]
    drop_if_stale(directory, [package / f"{name}.py" for name in COMPILED])
