"""Every CUDA-only branch of engine/, mezo/ and the kernels' launchers, run on CPU under fakes
(issue 10, acceptance 1): pool sizing from free GPU memory, dtype/device defaults, the kernel and
attention backend choice, zo_update_'s pinned, non-blocking host->device copy, and the data-parallel
throughput split's GPU timing."""
from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

import engine.kernel_choice as kernel_choice
from engine import Engine
from engine.attention_backend import AttentionBackend
from engine.engine import DEFAULT_GPU_CACHE_FRACTION, _resolve_device, _resolve_dtype, cache_pages
from engine.kv_pool import KVPool
from kernels import attention as attn
from kernels import zo_update as zo

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cpu_engine() -> Engine:
    return Engine.from_hf(tiny_llama(seed=2), dtype="float32", device="cpu", max_cache_tokens=256)


def fake_free_memory(monkeypatch, free: int, seen: list | None = None) -> None:
    def mem_get_info(device=None):
        if seen is not None:
            seen.append(device)
        return free, 80 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_pool_on_cuda_is_half_the_free_memory(cpu_engine, monkeypatch, dtype) -> None:
    """Engine() with max_cache_tokens=None on CUDA: the pool (null page included) fits in half of
    the free memory and one more page would not."""
    free = 3 * (1 << 20) + 12345
    seen: list = []
    fake_free_memory(monkeypatch, free, seen)
    spec = cpu_engine.spec
    page_bytes = 2 * spec.num_layers * 16 * spec.num_kv_heads * spec.head_dim * dtype.itemsize
    pages = cache_pages(spec, CUDA, dtype, 16, None)
    budget = int(free * DEFAULT_GPU_CACHE_FRACTION)
    assert seen == [CUDA]
    assert pages >= 2 and pages * page_bytes <= budget < (pages + 1) * page_bytes
    assert pages * page_bytes == KVPool.page_bytes(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim, dtype) * pages


def test_engine_num_pages_takes_the_cuda_branch(cpu_engine, monkeypatch) -> None:
    """The Engine's own sizing call (the line that raised TypeError) on a CUDA device."""
    fake_free_memory(monkeypatch, 1 << 22)
    eng = cpu_engine
    monkeypatch.setattr(eng, "device", CUDA)
    want = 1 + KVPool.pages_for_budget(1 << 21, eng.spec.num_layers, eng.page_size, eng.spec.num_kv_heads,
                                       eng.spec.head_dim, eng.dtype)
    assert eng._num_pages(None) == want > 2


def test_explicit_budget_on_cuda_ignores_free_memory(cpu_engine, monkeypatch) -> None:
    def boom(device=None):
        raise AssertionError("mem_get_info must not be read when max_cache_tokens is given")

    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    assert cache_pages(cpu_engine.spec, CUDA, torch.bfloat16, 16, 1000) == 1 + 63


def test_no_room_for_one_page_is_a_clear_error(cpu_engine, monkeypatch) -> None:
    fake_free_memory(monkeypatch, 1000)
    with pytest.raises(ValueError, match="max_cache_tokens"):
        cache_pages(cpu_engine.spec, CUDA, torch.bfloat16, 16, None)


def test_cpu_default_pool_and_bad_budget(cpu_engine) -> None:
    assert cache_pages(cpu_engine.spec, CPU, torch.float32, 16, None) == 1 + 32768 // 16
    with pytest.raises(ValueError, match="max_cache_tokens"):
        cache_pages(cpu_engine.spec, CPU, torch.float32, 16, 8)


def test_auto_device_and_dtype(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device("auto") == CUDA
    assert _resolve_dtype("auto", CUDA) == torch.bfloat16
    assert _resolve_dtype("auto", CPU) == torch.float32
    assert _resolve_dtype("fp16", CUDA) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="dtype='float64'"):
        _resolve_dtype("float64", CPU)


@pytest.mark.parametrize("flash", [False, True])
def test_kernel_and_attention_choice_on_cuda(monkeypatch, flash) -> None:
    monkeypatch.setattr(attn, "flash_attn_available", lambda: flash)
    assert kernel_choice.resolve_kernels("auto", CUDA) == "triton"
    assert kernel_choice.resolve_kernels("torch", CUDA) == "torch"
    assert kernel_choice.resolve_kernels("triton", CUDA) == "triton"
    select = AttentionBackend.select
    assert select("auto", CUDA, 16, "auto").name == "triton"  # flash-attn's paged KV needs 256-token pages
    assert select("auto", CUDA, 256, "auto").name == ("flash_attn" if flash else "triton")
    assert select("auto", CUDA, 256, "triton").name == "triton"  # an explicit kernels="triton" is obeyed
    assert select("auto", CUDA, 256, "torch").name == "torch"
    assert select("torch", CUDA, 256, "auto").name == "torch"
    if flash:
        assert select("flash_attn", CUDA, 256, "torch").name == "flash_attn"
    else:
        with pytest.raises(ValueError, match="flash_attn"):
            select("flash_attn", CUDA, 256, "auto")


def test_kernel_choice_on_cpu() -> None:
    assert kernel_choice.resolve_kernels("auto", CPU) == "torch"
    assert AttentionBackend.select("auto", CPU, 16, "auto").name == "torch"
    with pytest.raises(ValueError, match="kernels='cuda'"):
        kernel_choice.resolve_kernels("cuda", CPU)
    with pytest.raises(ValueError, match="attention_backend='xformers'"):
        AttentionBackend.select("xformers", CPU, 16, "auto")
    with pytest.raises(ValueError, match="flash_attn"):
        AttentionBackend.select("flash_attn", CPU, 256, "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only switched on without a GPU")
def test_this_process_runs_triton_in_the_interpreter() -> None:
    assert kernel_choice.triton_interpreted()  # tests/conftest.py set TRITON_INTERPRET=1 before the import
    assert kernel_choice.resolve_kernels("triton", CPU) == "triton"


@pytest.mark.parametrize("env", [None, "1"])
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch, env) -> None:
    monkeypatch.setattr(kernel_choice, "triton_interpreted", lambda: False)
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:  # set, but after triton was imported: too late, and the message says so
        monkeypatch.setenv("TRITON_INTERPRET", env)
    hf = tiny_llama(seed=2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as info:
        Engine.from_hf(hf, dtype="float32", device="cpu", max_cache_tokens=256, kernels="triton")
    assert ("after" in str(info.value)) == (env == "1")
    with pytest.raises(ValueError, match="attention_backend='triton'.*TRITON_INTERPRET=1"):
        Engine.from_hf(hf, dtype="float32", device="cpu", max_cache_tokens=256, attention_backend="triton")
    # Triton on CUDA needs no interpreter
    kernel_choice.check_triton_device(CUDA)


def test_zo_update_seeds_go_pinned_and_non_blocking_to_cuda(monkeypatch) -> None:
    """zo_update_'s CUDA branch: seeds are staged in pinned memory and copied without a host wait."""
    calls: list = []

    def pin_memory(self):
        calls.append(("pin", self.dtype))
        return self

    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and torch.device(args[0]).type == "cuda":
            calls.append(("to", torch.device(args[0]).type, kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    seeds = zo._seed_tensor([5, 2**31 - 2, 7], CUDA)
    assert calls == [("pin", torch.int64), ("to", "cuda", True)]
    assert seeds.tolist() == [5, 2**31 - 2, 7]
    calls.clear()
    zo._seed_tensor([1, 2], CPU)  # CPU: a plain tensor, nothing pinned
    assert calls == []


def test_trainer_update_uses_the_engine_kernels(monkeypatch) -> None:
    """MeZOTrainer.apply_update runs zo_update_many_ with the engine's kernels (the ZO update follows the switch)."""
    import mezo.trainer as trainer_mod
    from mezo import MeZOConfig, MeZOTrainer
    from mezo_helpers import make_engine

    eng = make_engine()
    trainer = MeZOTrainer(eng, MeZOConfig(seed=1))
    impls = []
    monkeypatch.setattr(trainer_mod, "zo_update_many_", lambda params, *a, impl, **k: impls.append((impl, len(params))))
    trainer.apply_update([3], torch.tensor([0.5]), 1e-3)
    assert impls == [("torch", len(trainer.params))]
    monkeypatch.setattr(eng, "kernels", "triton")
    impls.clear()
    trainer.apply_update([3], torch.tensor([0.5]), 1e-3)
    assert impls == [("triton", len(trainer.params))]


@pytest.mark.parametrize("balance, device, syncs",
                         [("throughput", CUDA, 1), ("tokens", CUDA, 0), ("throughput", CPU, 0)])
def test_throughput_split_waits_for_the_gpu_before_timing(monkeypatch, balance, device, syncs):
    """DistributedMeZOTrainer times a rank's launch for shard_balance="throughput": on CUDA it synchronizes
    first (else the seconds are the host's queueing); the default split and CPU ranks never wait."""
    from types import SimpleNamespace

    from mezo import MeZOConfig
    from mezo.distributed import DistributedMeZOTrainer

    seen: list = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: seen.append(d))
    trainer = SimpleNamespace(config=MeZOConfig(shard_balance=balance))
    DistributedMeZOTrainer._timing_sync(trainer, device)
    assert seen == [device] * syncs


def test_collective_buffers_are_filled_on_their_own_device():
    """Every tensor factory in mezo/distributed.py names its device: a CPU tensor index-written into a
    collective buffer works on gloo (CPU) but raises under NCCL, where the buffer is on the GPU (the
    sharded evaluation's accuracy slots once did). A static check, since CPU tensors cannot fake CUDA."""
    import ast
    import inspect

    import mezo.distributed as d

    factories = {"tensor", "zeros", "ones", "full", "empty", "arange"}
    missing = [node.lineno for node in ast.walk(ast.parse(inspect.getsource(d)))
               if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr in factories and isinstance(node.func.value, ast.Name)
               and node.func.value.id == "torch" and not any(k.arg == "device" for k in node.keywords)]
    assert missing == [], f"torch factories without device= at mezo/distributed.py lines {missing}"
