"""The MeZO estimate (L+ − L−)/(2ε) from one batched run of both branches agrees with the autograd
directional derivative ∇L·z of the same loss on the transformers + PEFT model (same weights, same z)."""
import pytest
import torch
from peft import PeftModel

from mezo import MeZOConfig, MeZOTrainer
from mezo_fixtures import FEW_SHOT
from mezo_helpers import base_hf, classification_examples, hf_loss, make_engine, randomize_lora_b

EPS = 1e-3
SEEDS = (11, 12, 13)
CANDIDATES = {"single": [" business", " sport", " tech", " politics"],
              "multi": [" sports news", " world politics", " business and finance"]}


@pytest.mark.parametrize("kind", sorted(CANDIDATES))
def test_spsa_estimate_matches_autograd_directional_derivative(kind, tmp_path):
    engine = make_engine()
    trainer = MeZOTrainer(engine, MeZOConfig(eps=EPS, lora_rank=8, lora_alpha=16))
    randomize_lora_b(engine, std=0.05)  # nonzero adapter: the loss is not flat along z_A
    encoded = trainer.encode(classification_examples(FEW_SHOT, CANDIDATES[kind])[:3])

    # the same weights on the transformers side: the engine's adapter, written and read by PEFT
    engine.save_adapter(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base_hf(), tmp_path / "adapter", is_trainable=True).eval()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n.replace(".default", ""): p for n, p in trainable.items()}
    assert set(ours) == set(trainer.params), "PEFT and the engine disagree on the trainable tensors"
    for name, p in ours.items():
        assert torch.equal(p.detach(), trainer.params[name]), name

    loss = hf_loss(peft_model, encoded)
    assert loss.item() == pytest.approx(trainer.evaluate(encoded)["loss"], rel=1e-5)
    loss.backward()

    for seed in SEEDS:
        z = trainer.noise(seed)
        directional = sum(float((p.grad * z[name]).sum()) for name, p in ours.items())
        assert abs(directional) > 0.05, "choose another seed: ∇L·z is too close to 0 for a 1% check"
        loss_plus, loss_minus = trainer.branch_losses(encoded, seed)
        estimate = float((loss_plus - loss_minus) / (2 * EPS))
        assert estimate == pytest.approx(directional, rel=0.01), f"seed {seed}"
