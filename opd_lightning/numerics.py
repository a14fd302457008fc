"""Process-wide numerical set-up, done once on import, before any parallel CPU work.

PyTorch hands contiguous float32/float64 unary ops on the CPU (`exp`, `log`, `sqrt`, ...) to MKL's vector math
library, which chooses each function's kernel on that function's first call. When the first call runs on several
intra-op threads at once, one thread can run a low-accuracy kernel for its share of that call (PyTorch issue 188792;
fixed in oneMKL 2025). On this project's machine, `exp` of a `[9, 404]` block on two threads came out up to 1.5e-4 off
(relative) in the second thread's half in 9 of 60 fresh processes, later calls exact: in `bpe_subset`, the first
projection of a process then put a few 1e-5 of mass in the wrong place. One single-element call per function and
precision, made here on one thread, settles every choice first: importing this module does it, and
`opd_lightning.losses` and `opd_lightning.aligners` import it before anything else.
"""

from __future__ import annotations

import torch

__all__ = ["VECTOR_MATH", "settle_vector_math"]

# The unary ops PyTorch builds have routed to MKL's vector math library (`aten/src/ATen/cpu/vml.h`), a superset.
VECTOR_MATH = ("abs", "acos", "asin", "atan", "cos", "erf", "erfc", "exp", "expm1", "log", "log10", "log1p", "log2",
               "sin", "sqrt", "tan", "tanh", "trunc")
_settled = False


def settle_vector_math() -> None:
    """Calls each of `VECTOR_MATH` once on one float32 and one float64 element (once per process; nothing to do
    without MKL)."""
    global _settled
    if _settled or not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for name in VECTOR_MATH:
            getattr(torch, name)(one)
    _settled = True


settle_vector_math()
