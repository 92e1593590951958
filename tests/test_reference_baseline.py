"""The reference MeZO baseline against explicit theta +- eps z (z from torch's generator, same seed).

Precision note. The reference moves weights +eps z, -2 eps z, +eps z in place. L(theta + eps z) is
bit-identical to the explicit computation, but (theta + eps z) - 2 eps z differs from theta - eps z in
the last bit of some weights, and g = dL / (2 eps) amplifies that loss-level rounding by 1/(2 eps)
= 500. In fp32 that gives ~1e-4 relative disagreement for some seeds (0 for others), so the 1e-6
relative check runs in float64, where the same rounding is ~1e-13; fp32 gets a checked-in looser
bound plus exact checks of the weights each forward saw.
"""
import pytest
import torch

from bench.baselines.reference_mezo import ReferenceMeZO, batch_loss, build_batch, decays
from mezo.data import ClassificationExample, LMExample

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EPS, LR = 1e-3, 1e-2
EXAMPLES = [ClassificationExample("the cat sat", [" on", " under the mat"], 1),
            ClassificationExample("a b c d", [" x", " y", " zz"], 0)]
LM_EXAMPLES = [LMExample("one two", " three four"), LMExample("x", " y z w v")]


def encode(s: str) -> list[int]:
    """A stand-in tokenizer: BOS then one id per character."""
    return [1] + [3 + ord(c) % 120 for c in s]


def lora_model(dtype=torch.float32):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # PEFT inits B = 0; nonzero B makes the A-direction matter too
    return pm.to(dtype).eval()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def draw_z(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.normal(0.0, 1.0, size=p.shape, generator=gen, dtype=p.dtype) for p in params]


def explicit_grad(model, batch, theta, zs):
    losses = []
    for sign in (1, -1):
        for p, t, z in zip(trainable(model), theta, zs):
            p.data = t + sign * EPS * z
        with torch.no_grad():
            losses.append(batch_loss(model, batch))
    for p, t in zip(trainable(model), theta):
        p.data = t.clone()
    return ((losses[0] - losses[1]) / (2 * EPS)).item()


@pytest.mark.parametrize("examples", [EXAMPLES, LM_EXAMPLES], ids=["classification", "lm"])
def test_projected_grad_matches_explicit_fp64(examples):
    model = lora_model(torch.float64)
    batch = build_batch(examples, encode)
    ref = ReferenceMeZO(model, lr=LR, eps=EPS)
    theta = [p.detach().clone() for p in trainable(model)]
    for seed in (0, 1, 7):
        zs = draw_z(theta, seed)
        expect = explicit_grad(model, batch, theta, zs)
        got = ref.projected_grad(batch, seed)
        assert abs(expect) > 1e-3
        assert abs(got - expect) <= 1e-6 * abs(expect), (seed, got, expect)
        for p, t in zip(trainable(model), theta):  # restored up to rounding; reset exactly for the next seed
            torch.testing.assert_close(p.data, t, rtol=0, atol=1e-15)
            p.data = t.clone()


def test_fp32_perturbations_and_restore():
    model = lora_model()
    batch = build_batch(EXAMPLES, encode)
    theta = [p.detach().clone() for p in trainable(model)]
    seen = []

    def recording_loss(m, b):
        seen.append([p.detach().clone() for p in trainable(m)])
        return batch_loss(m, b)

    ref = ReferenceMeZO(model, lr=LR, eps=EPS, loss_fn=recording_loss)
    seed = 3
    got = ref.projected_grad(batch, seed)
    zs = draw_z(theta, seed)
    ulp = torch.finfo(torch.float32).eps
    for t, z, plus, minus, p in zip(theta, zs, seen[0], seen[1], trainable(model)):
        assert torch.equal(plus, t + EPS * z)  # first forward saw exactly theta + eps z
        bound = 2 * ulp * (t.abs() + 2 * EPS * z.abs())  # (theta + eps z) - 2 eps z: <= ~1 ulp off
        assert ((minus - (t - EPS * z)).abs() <= bound).all()
        assert ((p.data - t).abs() <= bound).all()  # restore drift of +eps -2eps +eps, as in the reference
    with torch.no_grad():
        exact = ((batch_loss_at(model, batch, seen[0]) - batch_loss_at(model, batch, seen[1])) / (2 * EPS)).item()
    assert got == exact  # g is exactly the difference quotient of the two losses it evaluated
    expect = explicit_grad(model, batch, theta, zs)
    assert abs(got - expect) <= 1e-3 * abs(expect)  # see the module docstring


def batch_loss_at(model, batch, values):
    saved = [p.data for p in trainable(model)]
    for p, v in zip(trainable(model), values):
        p.data = v
    loss = batch_loss(model, batch)
    for p, s in zip(trainable(model), saved):
        p.data = s
    return loss


@pytest.mark.parametrize("dtype,wd", [(torch.float64, 0.0), (torch.float64, 0.1), (torch.float32, 0.0)])
def test_step_updates_theta_minus_lr_g_z(dtype, wd):
    model = lora_model(dtype)
    batch = build_batch(EXAMPLES, encode)
    theta = [p.detach().clone() for p in trainable(model)]
    ref = ReferenceMeZO(model, lr=LR, eps=EPS, weight_decay=wd)
    loss = ref.step(batch, seed=5)
    g = ref.last_projected_grad
    assert loss == ref.last_loss and g != 0.0
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for t, z, p in zip(theta, draw_z(theta, 5), trainable(model)):
        torch.testing.assert_close(p.data, t - LR * (g * z + wd * t), rtol=0, atol=tol)


def test_batch_loss_matches_unpadded_per_example():
    model = lora_model(torch.float64)
    with torch.no_grad():
        loss = batch_loss(model, build_batch(EXAMPLES, encode)).item()
        per_ex = []
        for ex in EXAMPLES:
            scores = []
            for c in ex.candidates:
                ids = torch.tensor([encode(ex.prompt + c)])
                k = len(ids[0]) - len(encode(ex.prompt))
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
                tok = logp.gather(-1, ids[0, 1:, None])[:, 0]
                scores.append(tok[-k:].mean())
            per_ex.append(-torch.log_softmax(torch.stack(scores), 0)[ex.label])
        assert abs(loss - torch.stack(per_ex).mean().item()) < 1e-10
        lm_loss = batch_loss(model, build_batch(LM_EXAMPLES, encode)).item()
        nll, count = 0.0, 0
        for ex in LM_EXAMPLES:
            ids = torch.tensor([encode(ex.prompt + ex.target)])
            k = len(ids[0]) - len(encode(ex.prompt))
            logits = model(input_ids=ids).logits[0, -k - 1:-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, -k:], reduction="sum").item()
            count += k
        assert abs(lm_loss - nll / count) < 1e-10


def test_build_batch_separate_continuation_and_errors():
    b = build_batch(EXAMPLES[:1], encode, pad_id=0, encode_continuation=lambda s: encode(s)[1:])
    assert b.target_lens == [3, 14] and b.num_options == [2] and b.labels.tolist() == [1]
    assert b.input_ids.shape == (2, 1 + 11 + 14) and b.attention_mask.sum().item() == sum(b.lengths)
    with pytest.raises(ValueError, match="one kind of example"):
        build_batch([EXAMPLES[0], LM_EXAMPLES[0]], encode)
    with pytest.raises(ValueError, match="continuation is 0 tokens"):
        build_batch([LMExample("abc", "d")], lambda s: [1, 2])
    assert decays("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert not decays("model.layers.0.input_layernorm.weight") and not decays("model.norm.weight")
