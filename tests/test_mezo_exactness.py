"""MeZO exactness (DESIGN §8): the two branches of one batched run give exactly the losses of every
example run ALONE on the unperturbed path with the trainable tensors explicitly set to θ ± ε·z."""
import pytest
import torch

from mezo import ClassificationExample, LMExample, MeZOConfig, MeZOTrainer
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import make_engine, randomize_lora_b, snapshot, tokenizer

REL = 1e-5
SINGLE = [" business", " entertainment", " politics", " sport", " tech"]
MULTI = [" sports news", " world politics", " business and finance", " arts and culture"]


def _n_tokens(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=False))


def test_candidate_token_counts():
    """The candidate sets really are what the cases below claim (SmolLM2 tokenizer)."""
    assert all(_n_tokens(c) == 1 for c in SINGLE)
    assert all(_n_tokens(c) > 1 for c in MULTI)


def _examples(kind: str, prefix: str):
    heads = HEADLINES[:4]
    if kind == "single":
        return [ClassificationExample(f"{prefix}Headline: {h}\nTopic:", SINGLE, i % 5) for i, h in enumerate(heads)]
    if kind == "multi":
        return [ClassificationExample(f"{prefix}Headline: {h}\nTopic:", MULTI, i % 4) for i, h in enumerate(heads)]
    if kind == "mixed":  # single- and multi-token examples in one batch, plus an exact duplicate
        exs = [ClassificationExample(f"{prefix}Headline: {h}\nTopic:", SINGLE if i % 2 else MULTI, i % 4)
               for i, h in enumerate(heads[:3])]
        return exs + [exs[0]]
    if kind == "lm":
        targets = [" sport", " tech news today", " business as usual", " entertainment and music"]
        return [LMExample(f"{prefix}Headline: {h}\nTopic:", t) for h, t in zip(heads, targets)]
    raise AssertionError(kind)


def _reference(engine, trainer, examples, theta, z, sign, eps):
    """Mean over examples of each example's loss, run alone, unperturbed, at θ + sign·ε·z."""
    engine.set_trainable({k: theta[k] + sign * eps * z[k] for k in theta})
    losses = []
    for ex in examples:
        engine.reset_cache()  # alone: nothing reused from the other examples
        losses.append(trainer.evaluate([ex])["loss"])
    engine.set_trainable(theta)
    return sum(losses) / len(losses)


CASES = [
    # (mode, objective, examples, few-shot prefix?)
    ("lora", "classification", "single", True),
    ("lora", "classification", "single", False),
    ("lora", "classification", "multi", True),
    ("lora", "classification", "multi", False),
    ("lora", "classification", "mixed", True),
    ("lora", "lm", "lm", True),
    ("full", "classification", "single", True),
    ("full", "classification", "single", False),
    ("full", "classification", "multi", True),
    ("full", "classification", "multi", False),
    ("full", "lm", "lm", False),
]


@pytest.mark.parametrize("mode,objective,kind,few_shot", CASES,
                         ids=[f"{m}-{k}-{'fewshot' if f else 'noprefix'}" for m, _, k, f in CASES])
def test_branch_losses_equal_explicit_perturbation(mode, objective, kind, few_shot, device):
    eps = 1e-2  # large enough that θ ± εz moves the loss far more than the tolerance
    engine = make_engine(device=device)
    trainer = MeZOTrainer(engine, MeZOConfig(mode=mode, objective=objective, eps=eps, seed=3))
    if mode == "lora":
        randomize_lora_b(engine)
    examples = _examples(kind, FEW_SHOT if few_shot else "")
    prompts = [e.prompt for e in trainer.encode(examples)]
    shared = min(next((i for i, t in enumerate(zip(*pair)) if t[0] != t[1]), min(map(len, pair)))
                 for pair in zip(prompts, prompts[1:]))
    if few_shot:  # the batch really shares the few-shot prompt (over 3 pages of 16 tokens)
        assert shared >= len(tokenizer().encode(FEW_SHOT, add_special_tokens=False)) - 1 > 48
    else:
        assert shared < 16
    theta = snapshot(engine)
    seed = 1000 + CASES.index((mode, objective, kind, few_shot))

    loss_plus, loss_minus = trainer.branch_losses(examples, seed)
    assert loss_plus.dtype == torch.float32 and loss_plus.dim() == 0
    for k, v in engine.trainable_parameters().items():  # the branches never write into θ
        assert torch.equal(v, theta[k]), k

    z = trainer.noise(seed)
    assert set(z) == set(theta)
    ref_plus = _reference(engine, trainer, examples, theta, z, +1, eps)
    ref_minus = _reference(engine, trainer, examples, theta, z, -1, eps)
    # the perturbation is visible well above the tolerance, so a wrong sign/seed/branch would fail
    assert abs(ref_plus - ref_minus) > 20 * REL * abs(ref_plus)
    assert float(loss_plus) == pytest.approx(ref_plus, rel=REL, abs=0)
    assert float(loss_minus) == pytest.approx(ref_minus, rel=REL, abs=0)


def test_branch_losses_per_example_and_batch_independent(device):
    """Each example's branch loss does not depend on which other examples share its batch."""
    engine = make_engine(device=device)
    trainer = MeZOTrainer(engine, MeZOConfig(eps=1e-2))
    randomize_lora_b(engine)
    examples = _examples("mixed", FEW_SHOT)[:3]
    batch_plus, batch_minus = trainer.branch_losses(examples, 99)
    alone = [trainer.branch_losses([ex], 99) for ex in examples]
    assert float(batch_plus) == pytest.approx(sum(float(p) for p, _ in alone) / 3, rel=REL, abs=0)
    assert float(batch_minus) == pytest.approx(sum(float(m) for _, m in alone) / 3, rel=REL, abs=0)
