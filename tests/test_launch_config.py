"""Launch configurations (kernels/launch_config.py): the CUDA tiles run correctly (in the interpreter),
64-bit seeds reach the kernels intact, and bad input raises clear errors."""
import pytest
import torch

import kernels.attention as attention
import kernels.lora as lora
from kernels import noisy_lora_linear
from kernels.launch_config import (INTERPRETER, LaunchTarget, cuda_target, decode_attention_config,
                                   extend_attention_config, lora_down_config, noisy_linear_config)

SEEDS64 = dict(seed_a=2**40 + 7, seed_b=2**63 - 5, weight_seed=2**31 + 3)  # i64 in the kernels


def _problem(m, k, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5 if r else None
    b = torch.randn(n, r, generator=g) if r else None
    signs = torch.tensor([(-1.0, 0.0, 1.0)[i % 3] for i in range(m)])
    return x, w, a, b, signs


def _both(x, w, a, b, signs, weight_seed):
    kw = dict(signs=signs, seed_a=SEEDS64["seed_a"], seed_b=SEEDS64["seed_b"], eps=1e-2, scale=2.0,
              weight_seed=weight_seed)
    return noisy_lora_linear(x, w, a, b, impl="triton", **kw), noisy_lora_linear(x, w, a, b, impl="torch", **kw)


@pytest.mark.parametrize("r,full", [(64, False), (8, True)])
def test_cuda_tiles_match_reference_with_64bit_seeds(monkeypatch, r, full):
    """The sm_90 configuration (BLOCK_N 64, BLOCK_K 16, a 4-trip R_CHUNK epilogue at r 64) in the
    interpreter, with seeds >= 2^31, against the torch twin."""
    monkeypatch.setattr(lora, "target_of", lambda device: cuda_target(90))
    seen = []
    real = lora.noisy_linear_config
    monkeypatch.setattr(lora, "noisy_linear_config", lambda *a: seen.append(real(*a)) or seen[-1])
    x, w, a, b, signs = _problem(20, 48, 70, r)
    got, ref = _both(x, w, a, b, signs, SEEDS64["weight_seed"] if full else None)
    assert seen and seen[0] == noisy_linear_config(20, 70, 48, r, torch.float32, torch.float32, full, cuda_target(90))
    assert (seen[0].block_n, seen[0].block_k, seen[0].r_chunk) == (64, 16, 16)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the high seed word matters: dropping it changes the noise
    wrong = noisy_lora_linear(x, w, a, b, signs=signs, seed_a=SEEDS64["seed_a"], seed_b=SEEDS64["seed_b"] % 2**32,
                              eps=1e-2, scale=2.0, impl="triton",
                              weight_seed=SEEDS64["weight_seed"] % 2**31 if full else None)
    assert not torch.allclose(wrong, ref, rtol=1e-5, atol=1e-5)


def test_attention_cuda_tiles_match_reference(monkeypatch):
    from test_attention_kernels import make_extend  # the kernel tests' paged-KV builder

    monkeypatch.setattr(attention, "target_of", lambda device: cuda_target(90))
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend([5, 0], [7, 3], 16, 2, 3, 64, torch.float32, "cpu")
    got = attention.extend_attention_triton(q, k_pool, v_pool, pt, qo, pre, 0.125)
    ref = attention.extend_attention_torch(q, k_pool, v_pool, pt, qo, pre, 0.125)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_decode_cuda_tiles_match_reference(monkeypatch):
    """The CUDA merge pads splits to 64 (most lanes masked) and pages of 12 use division, not shifts."""
    from test_attention_kernels import make_decode

    monkeypatch.setattr(attention, "target_of", lambda device: cuda_target(90))
    for page_size, splits in ((16, 3), (12, 2)):
        q, k_pool, v_pool, pt, sl, _, _ = make_decode([70, 5], page_size, 2, 2, 64, torch.float32, "cpu")
        got = attention.decode_attention_triton(q, k_pool, v_pool, pt, sl, 0.125, num_kv_splits=splits)
        ref = attention.decode_attention_torch(q, k_pool, v_pool, pt, sl, 0.125)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_interpreter_and_cuda_configs_differ_where_intended():
    args = (4096, 4096, 4096, 64, torch.bfloat16, torch.bfloat16, False)
    cpu, gpu = noisy_linear_config(*args, INTERPRETER), noisy_linear_config(*args, cuda_target(90))
    assert (cpu.block_n, cpu.block_k, cpu.r_chunk) == (128, 128, 64)  # one epilogue trip in the interpreter
    assert (gpu.block_m, gpu.block_n, gpu.block_k, gpu.r_chunk, gpu.num_warps) == (128, 64, 64, 16, 8)
    assert gpu.low_prec and not noisy_linear_config(16, 64, 64, 8, torch.bfloat16, torch.float32, True,
                                                    cuda_target(90)).low_prec
    assert lora_down_config(4096, 4096, 64, torch.bfloat16, cuda_target(90)).block_k == 16
    assert lora_down_config(4096, 4096, 8, torch.bfloat16, cuda_target(90)).block_k == 32
    assert lora_down_config(4096, 4096, 8, torch.float32, cuda_target(80)).block_k == 16  # 32 spilled on sm_80
    assert extend_attention_config(4, 128, torch.bfloat16, 16, cuda_target(90)).block_m == 32
    # CUDA: one merge variant for every split count the launcher chooses; the interpreter pads tightly
    assert {decode_attention_config(4, 128, torch.bfloat16, 16, s, cuda_target(90)).splits_pad
            for s in range(1, 65)} == {64}
    assert decode_attention_config(4, 128, torch.bfloat16, 16, 5, INTERPRETER).splits_pad == 8
    # two row buckets on CUDA; sm_80 gets BLOCK_N 32 (no spills there)
    assert {noisy_linear_config(m, 4096, 4096, 8, torch.bfloat16, torch.bfloat16, False, cuda_target(90)).block_m
            for m in (1, 16, 33, 64, 65, 4096)} == {64, 128}
    assert noisy_linear_config(*args, cuda_target(80)).block_n == 32
    assert lora_down_config(1, 4096, 8, torch.bfloat16, cuda_target(90)).block_m == 64


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="backend"):
        LaunchTarget("rocm")
    with pytest.raises(ValueError, match="arch"):
        LaunchTarget("cuda", 0)
    with pytest.raises(ValueError, match="m must be >= 0"):
        noisy_linear_config(-1, 8, 8, 8, torch.float32, torch.float32, False, INTERPRETER)
    with pytest.raises(TypeError, match="x_dtype"):
        noisy_linear_config(1, 8, 8, 8, torch.int32, torch.float32, False, INTERPRETER)
    with pytest.raises(ValueError, match="group"):
        extend_attention_config(0, 64, torch.float16, 16, INTERPRETER)
    with pytest.raises(ValueError, match="unknown extend config keys"):
        extend_attention_config(1, 64, torch.float16, 16, INTERPRETER, {"block_q": 4})
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention_config(1, 64, torch.float16, 16, 0, INTERPRETER)
