"""`kernels="triton"` runs the whole engine and the MeZO step on the Triton kernels — compiled on a
GPU, in the interpreter on CPU — and gives what the torch path gives (issue 10, acceptance 2):
generate token for token, score / prompt_logits within 1e-5, and branch losses plus the parameters
after three MeZO steps within 1e-5 relative, LoRA and full mode, with and without a shared prefix,
single- and multi-token candidates in one batch. Tiny fp32 model (2 layers, hidden 64, GQA 4/2)."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels.attention as attn
import kernels.lora as lora
import kernels.zo_update as zo
from engine import SamplingParams
from mezo import ClassificationExample, MeZOConfig, MeZOTrainer
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import make_engine, randomize_lora_b, snapshot

SINGLE = [" business", " sport", " tech"]
MULTI = [" sports news", " world politics", " business and finance"]
REL = 1e-5


@pytest.fixture
def triton_calls(monkeypatch) -> dict[str, int]:
    """Counts the Triton launchers the engine reaches (so a silent fallback to torch would fail)."""
    counts = {"extend": 0, "decode": 0, "linear": 0, "update": 0}

    def spy(module, name, key):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(attn, "extend_attention_triton", "extend")
    spy(attn, "decode_attention_triton", "decode")
    spy(lora, "_noisy_lora_linear_triton", "linear")
    spy(zo, "_zo_update_triton", "update")
    return counts


def _engine(kernels: str, kernel_device: str, **kw):
    eng = make_engine(kernels=kernels, device=kernel_device, page_size=16, max_cache_tokens=4096, **kw)
    assert eng.kernels == kernels and eng.backend.name == kernels
    return eng


def test_generate_score_and_logits_equal_the_torch_path(kernel_device, triton_calls) -> None:
    prompts = ["The capital of France is", FEW_SHOT + "Headline: Band announces reunion tour\nTopic:"]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    results = {}
    for kernels in ("torch", "triton"):
        eng = _engine(kernels, kernel_device)
        eng.add_lora(r=4, target_modules=("q_proj", "v_proj", "down_proj"))
        randomize_lora_b(eng)  # a live adapter: unperturbed LoRA rows go through the fused kernel (σ = 0)
        ids = [o.token_ids for o in eng.generate(prompts, greedy, use_tqdm=False)]
        scores = eng.score(prompts[:2], [SINGLE, MULTI])
        logits = eng.prompt_logits([eng.encode(p) for p in prompts])
        results[kernels] = ids, scores, logits
    assert triton_calls["extend"] and triton_calls["decode"] and triton_calls["linear"]
    (ids_t, scores_t, logits_t), (ids_k, scores_k, logits_k) = results["torch"], results["triton"]
    assert ids_k == ids_t
    for a, b in zip(scores_k, scores_t):
        assert a == pytest.approx(b, rel=REL, abs=REL)
    for a, b in zip(logits_k, logits_t):
        torch.testing.assert_close(a, b, rtol=REL, atol=REL)


def _examples(prefix: str) -> list[ClassificationExample]:
    """Single- and multi-token candidate sets in one batch."""
    return [ClassificationExample(f"{prefix}Headline: {h}\nTopic:", MULTI if i % 2 else SINGLE, i % 3)
            for i, h in enumerate(HEADLINES[:2])]


@functools.lru_cache(maxsize=None)
def _three_steps(kernels: str, mode: str, few_shot: bool, device: str):
    """(branch losses of each step, step records, θ before, θ after) of three MeZO steps."""
    eng = _engine(kernels, device)
    lr = 1e-3 if mode == "lora" else 1e-4
    trainer = MeZOTrainer(eng, MeZOConfig(mode=mode, eps=1e-2, lr=lr, seed=3))
    if mode == "lora":
        randomize_lora_b(eng)
    branch, original = [], trainer.launch_losses

    def spy(*args, **kw):
        out = original(*args, **kw)
        branch.append(tuple(float(x) for x in out))
        return out

    trainer.launch_losses = spy
    before = snapshot(eng)
    encoded = trainer.encode(_examples(FEW_SHOT if few_shot else ""))
    records = [trainer.step(encoded) for _ in range(3)]
    return branch, records, before, snapshot(eng)


CASES = [("lora", True), ("lora", False), ("full", True), ("full", False)]


@pytest.mark.parametrize("mode,few_shot", CASES, ids=[f"{m}-{'fewshot' if f else 'noprefix'}" for m, f in CASES])
def test_three_mezo_steps_equal_the_torch_path(mode, few_shot, kernel_device, triton_calls) -> None:
    branch_t, records_t, before, after_t = _three_steps("torch", mode, few_shot, kernel_device)
    branch_k, records_k, _, after_k = _three_steps("triton", mode, few_shot, kernel_device)
    assert triton_calls["extend"] and triton_calls["linear"] and triton_calls["update"] == 3 * len(before)
    assert len(branch_k) == len(branch_t) == 3
    for (lp_k, lm_k), (lp_t, lm_t) in zip(branch_k, branch_t):
        assert abs(lp_t - lm_t) > 20 * REL * abs(lp_t)  # the perturbation is visible above the tolerance
        assert lp_k == pytest.approx(lp_t, rel=REL, abs=0)
        assert lm_k == pytest.approx(lm_t, rel=REL, abs=0)
    assert [r["seeds"] for r in records_k] == [r["seeds"] for r in records_t]
    assert not any(r["skipped"] for r in records_k)
    for name, theta_t in after_t.items():
        scale = theta_t.abs().max().item()
        moved = (theta_t - before[name]).abs().max().item()
        diff = (after_k[name] - theta_t).abs().max().item()
        assert moved > 100 * REL * scale, f"{name}: the three updates barely moved θ ({moved})"
        assert diff <= REL * scale, f"{name}: triton and torch differ by {diff} (|θ|max {scale})"
