"""How the process allocates and frees memory: tuned for a loop of large micro-batches.

`keep_freed_memory`: keep the C allocator from handing batch buffers back to the kernel after
every batch.

Each micro-batch allocates and frees a few megabytes of temporaries (gathered states, gate
activations). glibc returns freed blocks above its mmap/trim thresholds to the kernel, so the
next batch takes a page fault on every fresh 4 KiB page: measured here, that doubled the time of
the engine's recurrent step (12.1 ms -> 5.9 ms per 4,096 events with the thresholds raised). Raising
the thresholds keeps those blocks in the process for reuse; blocks of 64 MiB and more (the state
slabs themselves) are still mapped and unmapped directly.

`quiet_collector`: keep Python's cycle collector out of the batch loop. A batch holds tens of
thousands of tracked objects at once (records, decoded dicts, events), so with the default
threshold (700) the collector runs dozens of times per batch, promotes the whole batch to the
oldest generation and then sweeps the entire heap: measured in bench/pipeline.py, 23 full
collections of up to 526 ms in one run, 8.5 s in all. Freezing what exists at startup (modules,
the model) and letting a batch's objects be freed by reference counting before the first
collection removes those pauses.

>>> keep_freed_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 1 << 30
# Net new tracked objects before a young collection: above what one batch of 4,096 records holds.
GC_YOUNG_THRESHOLD = 200_000


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def quiet_collector() -> None:
    """Freeze every object alive now into the permanent generation (never scanned again) and
    raise the young generation's threshold; call once the process has loaded what it keeps."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
