"""LoRA adapters and trainable tensors on a CausalLM, named as PEFT names them.

Every trainable tensor gets a fixed index (model order, A before B): the MeZO noise of a tensor is
seeded by `derive_seed(step_seed, index)`, so the order here is part of the noise contract.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .linear import AdaptableLinear
from .model import CausalLM
from .peft_config import lora_scale, pattern_value, target_matches

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """Which linears carry LoRA and at which rank/scale, in PEFT's terms.

    ``target_modules``: module-name suffixes ('q_proj') or full names
    ('model.layers.0.self_attn.q_proj'); ``layers`` filters suffix matches (None = every layer).
    ``rank_pattern``/``alpha_pattern``: ordered (regex, value) pairs overriding r/alpha per module with
    PEFT's matching rule (`engine.peft_config.pattern_key`); ``use_rslora``: scale alpha/sqrt(r).
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None  # None = every layer
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        """The scale of a module no pattern names."""
        return lora_scale(self.r, self.alpha, self.use_rslora)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.alpha))

    def scale_for(self, name: str) -> float:
        return lora_scale(self.rank_for(name), self.alpha_for(name), self.use_rslora)

    def targets(self, name: str) -> bool:
        return target_matches(name, self.target_modules, self.layers)

    def validate(self, num_layers: int) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora rank r must be a positive int, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora alpha must be > 0, got {self.alpha!r}")
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = [m for m in self.target_modules if "." not in m and m not in known]
        if bad or not self.target_modules:
            raise ValueError(f"target_modules {list(self.target_modules)} must be non-empty and within {sorted(known)} "
                             "(or full module names)")
        if self.layers is not None and any(not 0 <= i < num_layers for i in self.layers):
            raise ValueError(f"layers {list(self.layers)} outside [0, {num_layers})")
        for field, values in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or \
                        (field == "rank_pattern" and not isinstance(v, int)):
                    raise ValueError(f"{field}[{key!r}]={v!r} must be a positive {'int' if field == 'rank_pattern' else 'number'}")

    def module_shapes(self, model: CausalLM) -> dict[str, tuple[int, float]]:
        """{module name: (rank, scale)} of every linear this spec adapts on ``model``."""
        return {name: (self.rank_for(name), self.scale_for(name)) for name in targeted_linears(model, self)}


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>....


def targeted_linears(model: CausalLM, spec: LoraSpec) -> dict[str, AdaptableLinear]:
    return {name: mod for name, mod in model.linears().items() if spec.targets(name)}


def attach_lora(model: CausalLM, spec: LoraSpec, seed: int = 0) -> None:
    """PEFT's default init: A ~ kaiming-uniform(a=√5) (like nn.Linear), B = 0, so the delta starts at 0."""
    spec.validate(model.spec.num_layers)
    detach_all(model)
    targeted = targeted_linears(model, spec)
    unused = [t for t in spec.target_modules if not any(target_matches(n, (t,), spec.layers) for n in targeted)]
    if unused:
        raise ValueError(f"target_modules {unused} match no linear of this model (layers={spec.layers})")
    gen = torch.Generator().manual_seed(seed)
    for name, mod in targeted.items():
        r = spec.rank_for(name)
        a = torch.empty(r, mod.in_features)
        bound = math.sqrt(6.0 / ((1 + 5.0) * mod.in_features))  # kaiming_uniform_ with a=sqrt(5)
        a.uniform_(-bound, bound, generator=gen)
        mod.set_lora(a, torch.zeros(mod.out_features, r), spec.scale_for(name))
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


def lora_modules(model: CausalLM) -> dict[str, tuple[int, float]]:
    """{module name: (rank, scale)} of the LoRA the model carries now."""
    return {n: (m.lora_a.shape[0], m.lora_scale) for n, m in model.linears().items() if m.has_lora}


def describe_modules(model: CausalLM, modules: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """(target_modules, layers) that select exactly ``modules`` among the model's linears: suffixes and
    layer indices when the set is such a product, else the full names (PEFT matches those exactly)."""
    modules = set(modules)
    suffixes = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    layers = tuple(sorted({_layer_of(m) for m in modules}))
    product = {n for n in model.linears() if n.rsplit(".", 1)[-1] in suffixes and _layer_of(n) in layers}
    if product == modules:
        return suffixes, (None if len(layers) == model.spec.num_layers else layers)
    return tuple(sorted(modules)), None


def load_lora_tensors(model: CausalLM, tensors: dict[str, torch.Tensor], scale_for: Callable[[str], float],
                      rank_for: Callable[[str], int] | None = None) -> list[str]:
    """Attach LoRA tensors keyed `base_model.model.<module>.lora_{A,B}.weight`, module m at scale
    ``scale_for(m)``; with ``rank_for``, A must be [rank_for(m), in]. Returns the module names.
    ValueError (naming the key) for unknown modules, missing halves or wrong ranks; on error the
    model is left without an adapter."""
    linears = model.linears()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, ab = key[len(PEFT_PREFIX):].rsplit(".", 2)[:2]
        if module not in linears:
            raise ValueError(f"adapter key {key!r}: no module {module!r} in this model")
        pairs.setdefault(module, {})[ab] = value
    detach_all(model)
    try:
        for module, ab in pairs.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise ValueError(f"adapter module {module!r} needs both lora_A and lora_B")
            if rank_for is not None and ab["lora_A"].shape[0] != rank_for(module):
                raise ValueError(f"adapter module {module!r}: lora_A has rank {ab['lora_A'].shape[0]} but the "
                                 f"config gives it r={rank_for(module)} (r / rank_pattern)")
            linears[module].set_lora(ab["lora_A"], ab["lora_B"], scale_for(module))
    except BaseException:
        detach_all(model)
        raise
    assign_indices(model)
    return sorted(pairs)
