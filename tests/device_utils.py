"""Tolerances keyed by dtype, for tests run on every (device, dtype) pair of conftest.DEVICE_DTYPES."""
from __future__ import annotations

import torch

# Engine logits against transformers' fp32 logits (|logits| ~ 3 on the tiny models). bf16: measured
# max |err| 0.036 on CPU bf16 over the tiny models (tiny_llama, page sizes 1/4/16); 2-3x margin. A wrong
# attention or rope moves logits by O(1), far outside either.
LOGITS_TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 0.1, "rtol": 0.05},
}


def logits_tol(dtype: torch.dtype) -> dict[str, float]:
    return LOGITS_TOL[dtype]
