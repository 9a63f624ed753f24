"""Software prefetch for the compiled kernels: ask the CPU to start loading a row before it is used.

The engine's per-stream rows are scattered over slabs of tens of MB, so a wave of 4,096 streams
touches 4,096 random rows: a kernel that walks them one after another waits for memory at the
start of each. `prefetch_row(array, row)` (numba only) issues one prefetch per 64-byte line of
`array[row]` (LLVM's `llvm.prefetch`; a hint, never a fault, a no-op where the CPU has none), so a
loop that calls it a few iterations ahead overlaps those loads with its own work. Measured on the
scoring kernel (4,096 random rows of 100,000, one thread, interleaved A/B): 5.6 -> 4.7 ms.

>>> import numba, numpy as np
>>> @numba.njit
... def total(a, rows):
...     s = 0.0
...     for i in range(len(rows)):
...         if i + 1 < len(rows):
...             prefetch_row(a, rows[i + 1])   # the next row loads while this one is summed
...         s += a[rows[i]].sum()
...     return s
>>> a = np.arange(12.0).reshape(4, 3)
>>> float(total(a, np.array([3, 0, 2])))           # rows 3, 0 and 2: 30 + 3 + 21
54.0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes per cache line
MAX_LINES = 16  # a row longer than this many lines is prefetched in part


@intrinsic
def _prefetch_row(typingctx, array, row):  # noqa: ARG001 - numba's intrinsic signature
    """Prefetch every cache line of row `row` of a C-contiguous 2-D array (of element `row` of a
    1-D one), for reading and writing (locality: keep in all cache levels)."""
    if not isinstance(array, types.Array) or array.ndim not in (1, 2) or array.layout != "C":
        return None
    sig = types.void(array, row)

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        index = [args[1]] + [ir.Constant(ir.IntType(64), 0)] * (array_type.ndim - 1)
        start = cgutils.get_item_pointer(
            context, builder, array_type, data, index, wraparound=False
        )
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # Named after the pointer type ("llvm.prefetch.p0", or ".p0i8" where LLVM's pointers
        # are typed), so that it links with every llvmlite that numba>=0.60 may bring.
        hint = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_ptr], ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        )
        base = builder.bitcast(start, byte_ptr)
        itemsize = ir.Constant(ir.IntType(64), array_type.dtype.bitwidth // 8)
        columns = builder.extract_value(data.shape, 1) if array_type.ndim == 2 else None
        row_bytes = builder.mul(columns, itemsize) if columns is not None else itemsize
        for line in range(MAX_LINES):
            offset = ir.Constant(ir.IntType(64), LINE * line)
            with builder.if_then(builder.icmp_signed("<", offset, row_bytes)):
                # rw = 1 (the rows are written back), locality = 3, data cache = 1
                args_ = [builder.gep(base, [offset]), i32(1), i32(3), i32(1)]
                builder.call(hint, args_)
        return context.get_dummy_value()

    return sig, codegen


# What compiled code calls: (array, row) -> None. The cast only tells type checkers so, as they
# see the intrinsic's typing signature (which takes the typing context first).
prefetch_row = cast(Callable[[Any, Any], None], _prefetch_row)
