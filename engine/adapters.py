"""LoRA adapters and trainable tensors on a CausalLM, named as PEFT names them.

Every trainable tensor gets a fixed index (model order, A before B): the MeZO noise of a tensor is
seeded by `derive_seed(step_seed, index)`, so the order here is part of the noise contract.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .linear import AdaptableLinear
from .model import CausalLM

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None  # None = every layer

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def validate(self, num_layers: int) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = [m for m in self.target_modules if m not in known]
        if bad or not self.target_modules:
            raise ValueError(f"target_modules {list(self.target_modules)} must be non-empty and within {sorted(known)}")
        if self.layers is not None and any(not 0 <= i < num_layers for i in self.layers):
            raise ValueError(f"layers {list(self.layers)} outside [0, {num_layers})")


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>....


def targeted_linears(model: CausalLM, spec: LoraSpec) -> dict[str, AdaptableLinear]:
    out = {}
    for name, mod in model.linears().items():
        if name.rsplit(".", 1)[-1] in spec.target_modules and (spec.layers is None or _layer_of(name) in spec.layers):
            out[name] = mod
    return out


def attach_lora(model: CausalLM, spec: LoraSpec, seed: int = 0) -> None:
    """PEFT's default init: A ~ kaiming-uniform(a=√5) (like nn.Linear), B = 0, so the delta starts at 0."""
    spec.validate(model.spec.num_layers)
    detach_all(model)
    gen = torch.Generator().manual_seed(seed)
    for mod in targeted_linears(model, spec).values():
        a = torch.empty(spec.r, mod.in_features)
        bound = math.sqrt(6.0 / ((1 + 5.0) * mod.in_features))  # kaiming_uniform_ with a=sqrt(5)
        a.uniform_(-bound, bound, generator=gen)
        mod.set_lora(a, torch.zeros(mod.out_features, spec.r), spec.scale)
    assign_indices(model)


@contextmanager
def restore_on_error(model: CausalLM) -> Iterator[None]:
    """If the body raises, put every linear's adapter state back as it was (attaching replaces
    tensors, it never writes into them, so keeping references is enough): a failed load never
    leaves a half-attached adapter that the engine's namespace and spec do not describe."""
    saved = {name: (m.lora_a, m.lora_b, m.lora_scale, m.index_a, m.index_b, m.index_w)
             for name, m in model.linears().items()}
    try:
        yield
    except BaseException:
        for name, m in model.linears().items():
            m.lora_a, m.lora_b, m.lora_scale, m.index_a, m.index_b, m.index_w = saved[name]
        raise


def detach_all(model: CausalLM) -> None:
    for mod in model.linears().values():
        mod.clear_lora()
        mod.index_w = -1


def enable_full(model: CausalLM) -> None:
    """Full-parameter mode: every decoder projection weight becomes a trainable fp32 tensor.
    (Embeddings, norms and the LM head stay frozen; see README.)"""
    detach_all(model)
    for mod in model.linears().values():
        mod.weight.data = mod.weight.data.float()
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.float()
        mod.index_w = 0
    assign_indices(model)


def assign_indices(model: CausalLM) -> None:
    index = 0
    for mod in model.linears().values():
        if mod.has_lora:
            mod.index_a, mod.index_b = index, index + 1
            index += 2
        if mod.index_w >= 0:
            mod.index_w = index
            index += 1


def trainable_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """The live trainable tensors in index order: PEFT keys for LoRA, HF keys in full mode."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.linears().items():
        if mod.has_lora:
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = mod.lora_a
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = mod.lora_b
        if mod.index_w >= 0:
            out[f"{name}.weight"] = mod.weight.data
    return out


def load_lora_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], scale: float) -> LoraSpec:
    """Attach LoRA tensors keyed `base_model.model.<module>.lora_{A,B}.weight`; returns the spec they imply."""
    linears = model.linears()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, ab = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]
        if module not in linears:
            raise ValueError(f"adapter key {key!r}: no module {module!r} in this model")
        pairs.setdefault(module, {})[ab] = value
    detach_all(model)
    ranks = set()
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter module {module!r} needs both lora_A and lora_B")
        linears[module].set_lora(ab["lora_A"], ab["lora_B"], scale)
        ranks.add(ab["lora_A"].shape[0])
    assign_indices(model)
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs}))
    layers = tuple(sorted({_layer_of(m) for m in pairs}))
    r = ranks.pop() if len(ranks) == 1 else 0
    return LoraSpec(r=r, alpha=scale * r, target_modules=targets, layers=layers)
