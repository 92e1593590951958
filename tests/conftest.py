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

# Where the Triton kernels run: compiled on a GPU, else in the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Engine and MeZO tests run on every device present: CPU always, CUDA too when there is one...
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ...and, where the dtype matters, fp32 everywhere plus bf16 on CUDA (tolerances: tests/device_utils.py).
DEVICE_DTYPES = [("cpu", torch.float32)] + (
    [("cuda", torch.float32), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])


@pytest.fixture
def kernel_device() -> str:
    """The device the Triton kernels run on here (kernel tests)."""
    return DEVICE


@pytest.fixture(scope="session")
def device(request) -> str:
    """Every device present: "cpu", and "cuda" when a GPU is (parametrized by the hook below).
    Session scope so that module-scoped fixtures (a shared engine) can take it. Kernel test modules
    override this fixture with `kernel_device` (a Triton kernel on a CPU tensor needs the interpreter)."""
    return request.param


def pytest_generate_tests(metafunc) -> None:
    """Tests taking this file's `device` run on every device of DEVICES; those that also take
    `dtype` on every (device, dtype) pair of DEVICE_DTYPES."""
    if "device" not in metafunc.fixturenames:
        return
    defs = metafunc._arg2fixturedefs.get("device")
    if not defs or defs[-1].func.__module__ != __name__:  # a module's own `device` fixture wins
        return
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize(("device", "dtype"), DEVICE_DTYPES, indirect=["device"], scope="session",
                             ids=[f"{d}-{str(t).removeprefix('torch.')}" for d, t in DEVICE_DTYPES])
    else:
        metafunc.parametrize("device", DEVICES, indirect=True, scope="session")


@pytest.fixture(scope="session")
def smollm2():
    """(transformers model, tokenizer) of the built-in SmolLM2-135M, fp32, loaded once per run."""
    from engine.loader import load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=torch.float32)
    return model.eval(), load_tokenizer(source)


@pytest.fixture
def fresh_noise_memo():
    """The CPU noise memo empty, at its default limit, for one test; restored afterwards."""
    from kernels import noise_cache

    previous = noise_cache.set_noise_cache_limit(noise_cache.DEFAULT_LIMIT_BYTES)
    noise_cache.clear_noise_cache()
    yield
    noise_cache.set_noise_cache_limit(previous)
    noise_cache.clear_noise_cache()
