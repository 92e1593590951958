"""Shared test set-up.

TRITON_INTERPRET must be set before triton is first imported (no GPU: kernels run in the
interpreter), so it happens here, at collection time.
"""
import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the compiled CPU Philox costs ~20 s of compilation per process: only its own test turns it on
os.environ.setdefault("MEZO_COMPILE_NOISE", "0")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def smollm2():
    """(transformers model, tokenizer) of the built-in SmolLM2-135M, fp32, loaded once per run."""
    from engine.loader import load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    return model.eval(), load_tokenizer(source)
