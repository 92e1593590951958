"""Engine logits and greedy generations equal transformers' (acceptance 1 and 2 of the engine issue)."""
from __future__ import annotations

import pytest
import torch
from device_utils import logits_tol
from tiny_models import random_prompts, tiny_llama

from engine import Engine, SamplingParams


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def check_ragged_with_cache(engine: Engine, hf, vocab: int, seed: int = 0, atol: float = 1e-4,
                            rtol: float = 1e-4) -> None:
    """First cache some prefixes, then run a ragged batch mixing cached and fresh sequences."""
    base = random_prompts(3, vocab, 9, 40, seed=seed)
    engine.prompt_logits(base[:2])  # populates the prefix cache with base[0], base[1]
    extra = random_prompts(3, vocab, 1, 20, seed=seed + 1)
    batch = [base[0] + extra[0], base[2], base[1] + extra[1], extra[2] + base[0]]
    starts = [len(base[0]), 0, len(base[1]) - 3, 0]
    out = engine.prompt_logits(batch, starts)
    cached = [r.cached_tokens for r in engine.last_requests]
    assert cached[0] > 0 and cached[2] > 0, f"expected prefix hits, got cached_tokens={cached}"
    assert cached[1] == 0
    for ids, start, got in zip(batch, starts, out):
        want = hf_logits(hf, ids)[start:]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_tiny_llama_logits_match_transformers(tie: bool, page_size: int, device: str, dtype: torch.dtype) -> None:
    hf = tiny_llama(tie=tie, seed=page_size)
    engine = Engine.from_hf(hf, page_size=page_size, max_cache_tokens=4096, dtype=dtype, device=device)
    check_ragged_with_cache(engine, hf, hf.config.vocab_size, seed=page_size, **logits_tol(dtype))


def test_attention_bias_and_gqa_ratio_one(device: str, dtype: torch.dtype) -> None:
    hf = tiny_llama(heads=4, kv_heads=4, attention_bias=True, seed=3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.1)
            layer.self_attn.v_proj.bias.normal_(0, 0.1)
    engine = Engine.from_hf(hf, page_size=4, max_cache_tokens=2048, dtype=dtype, device=device)
    check_ragged_with_cache(engine, hf, hf.config.vocab_size, seed=5, **logits_tol(dtype))


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2) -> None:
    hf, tok = smollm2
    engine = Engine.from_hf(hf, tok, page_size=16, max_cache_tokens=8192, dtype="float32", device="cpu")
    check_ragged_with_cache(engine, hf, hf.config.vocab_size, seed=11)


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):",
    "Q: What is 17 times 3?\nA:",
    "The three primary colors are",
    "In 1969, astronauts",
    "Translate to French: 'Good morning, my friend.'",
    "A haiku about autumn leaves:",
    "The main ingredients of a classic pizza margherita are",
    "import numpy as np\nx = np.arange(10)\n",
    "Photosynthesis is the process by which",
    "My favourite book is",
    "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox",
    "List three benefits of regular exercise:\n1.",
    "Water boils at",
    "SELECT name FROM users WHERE",
    "The French Revolution began in the year",
]


@pytest.mark.slow
def test_smollm2_greedy_generate_matches_transformers(smollm2) -> None:
    hf, tok = smollm2
    engine = Engine.from_hf(hf, tok, page_size=16, dtype="float32", device="cpu")
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0), use_tqdm=False)
    lengths = {o.prompt_tokens for o in outs}
    assert len(lengths) > 5, "prompts should be of mixed lengths"
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
        want = ref[0, ids["input_ids"].shape[1]:].tolist()
        assert out.token_ids == want, f"{prompt!r}: engine {out.token_ids} != transformers {want}"


def test_qwen2_architecture_matches_transformers(device: str, dtype: torch.dtype) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, rope_theta=1e6)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else None
        for layer in hf.model.layers:
            layer.self_attn.k_proj.bias.normal_(0, 0.1)
    engine = Engine.from_hf(hf, page_size=4, max_cache_tokens=2048, dtype=dtype, device=device)
    check_ragged_with_cache(engine, hf, 256, seed=21, **logits_tol(dtype))


@pytest.mark.parametrize("page_size", [1, 16])
def test_triton_attention_backend_matches_transformers(page_size: int, kernel_device: str) -> None:
    """Issue 4, acceptance 2: the same check through the Triton paged kernels (compiled on a GPU,
    the interpreter on CPU), against transformers and against the torch attention."""
    hf = tiny_llama(tie=False, seed=40 + page_size)
    engine = Engine.from_hf(hf, page_size=page_size, max_cache_tokens=2048, dtype="float32", device=kernel_device,
                            attention_backend="triton")
    assert engine.backend.name == "triton"
    check_ragged_with_cache(engine, hf, hf.config.vocab_size, seed=page_size)
    out = engine.generate(random_prompts(3, 256, 4, 9, seed=2), SamplingParams(max_tokens=4, temperature=0.0,
                                                                               ignore_eos=True), use_tqdm=False)
    ref = Engine.from_hf(hf, page_size=page_size, max_cache_tokens=2048, dtype="float32", device=kernel_device,
                         attention_backend="torch").generate(
        random_prompts(3, 256, 4, 9, seed=2), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        use_tqdm=False)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]  # decode kernel path too
