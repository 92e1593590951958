"""Shared test set-up: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so this happens at collection time.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
