"""PEFT's LoRA ``adapter_config.json``: which modules get LoRA, at which rank and scale.

The matching rules are PEFT's own (peft 0.21: ``check_target_module_exists`` in
``tuners/tuners_utils.py`` and ``get_pattern_key`` in ``utils/other.py``), restated here so that an
adapter means the same function in the engine as in ``PeftModel``. Every config field that changes
the function is either honoured or refused by name; fields that only matter while training in PEFT
(dropout, initialisers that leave the base weights alone) are ignored.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Pattern = tuple[tuple[str, float], ...]  # ordered (regex, value): the first match wins, as in a dict


def pattern_key(patterns: Sequence[str], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern p with ``re.match(rf"(.*\\.)?({p})$", name)``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", name):
            return p
    return None


def pattern_value(pattern: Pattern, name: str, default: float) -> float:
    key = pattern_key([p for p, _ in pattern], name)
    return default if key is None else dict(pattern)[key]


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (PEFT ``use_rslora``)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _layer_index(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    if not layers_pattern:  # the first numbered segment (peft: lazy, so not an MoE expert index)
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m["idx"]) if m else None


def target_matches(name: str, target_modules: str | Sequence[str], layers: int | Sequence[int] | None = None,
                   layers_pattern: Sequence[str] | None = None, exclude_modules: str | Sequence[str] | None = None
                   ) -> bool:
    """PEFT's ``check_target_module_exists`` for one module name (e.g. 'model.layers.0.self_attn.q_proj').

    ``target_modules``: a regex string (full match) or names (exact, or a suffix after a dot; only
    these are filtered by ``layers``). ``exclude_modules`` likewise (regex string or names)."""
    if exclude_modules:
        if isinstance(exclude_modules, str):
            if re.fullmatch(exclude_modules, name):
                return False
        elif name in exclude_modules or any(name.endswith(f".{e}") for e in exclude_modules):
            return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith(f".{t}") for t in target_modules):
        return False
    if layers is None or (not isinstance(layers, int) and len(layers) == 0):
        return True
    index = _layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


# config fields: honoured (read below), ignored (no effect on a loaded adapter's function), or
# refused unless they hold their "off" value. Anything else is unknown and refused unless empty.
_HONOURED = {"peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "init_lora_weights",
             "modules_to_save", "bias"}
_IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
            "lora_dropout", "megatron_config", "megatron_core", "loftq_config", "eva_config", "lora_ga_config",
            "qalora_group_size", "ensure_weight_tying", "runtime_config"}
# initialisations that rewrite the BASE weights (the adapter is a residual of a changed model)
_BASE_CHANGING_INIT = ("pissa", "olora", "corda", "loftq")


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass(frozen=True)
class PeftLoraConfig:
    """The function-relevant part of a PEFT LoRA ``adapter_config.json`` (see `parse`)."""

    r: int
    lora_alpha: float
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()
    use_rslora: bool = False

    @classmethod
    def parse(cls, config: dict[str, Any], where: str = "adapter_config.json") -> "PeftLoraConfig":
        """Validate and read ``config``; ValueError naming the field for anything this engine
        cannot reproduce exactly (DoRA, biases, modules_to_save, base-changing inits, ...)."""
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{where}: {field}={config.get(field)!r}: {why}")

        if config.get("peft_type") != "LORA":
            raise bad("peft_type", "only LoRA adapters are supported")
        refused = {
            "use_dora": "DoRA is not supported", "lora_bias": "LoRA biases are not supported",
            "modules_to_save": "fully trained extra modules are not supported",
            "layer_replication": "layer replication is not supported",
            "trainable_token_indices": "trainable tokens are not supported",
            "target_parameters": "LoRA on parameters (not modules) is not supported",
            "alora_invocation_tokens": "activated LoRA is not supported",
            "use_qalora": "QA-LoRA is not supported",
        }
        for field, why in refused.items():
            if not _is_off(config.get(field)):
                raise bad(field, why)
        if config.get("bias", "none") != "none":
            raise bad("bias", "only bias='none' is supported (the adapter would carry trained base biases)")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INIT):
            raise bad("init_lora_weights", "this initialisation changes the base weights; convert the adapter "
                      "to a plain LoRA first (peft: path_initial_model_for_weight_conversion)")
        unknown = sorted(k for k, v in config.items() if k not in _HONOURED | _IGNORED | set(refused)
                         and not _is_off(v))
        if unknown:
            raise ValueError(f"{where}: fields {unknown} are unknown to this engine and may change the adapter's "
                             "function; refusing rather than guessing")
        # fan_in_fan_out: PEFT turns it off for torch.nn.Linear (every LLaMA projection), so it is a no-op here

        r = config.get("r")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise bad("r", "must be an int >= 1")
        alpha = config.get("lora_alpha", 8)  # PEFT's default lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise bad("lora_alpha", "must be a number > 0")
        targets = config.get("target_modules")
        if isinstance(targets, str):
            targets = r"(?!lm_head$).*" if targets == "all-linear" else targets  # decoder projections only
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
            targets = tuple(targets)
        else:
            raise bad("target_modules", "must be a regex string or a non-empty list of module names")
        exclude = config.get("exclude_modules")
        exclude = tuple(exclude) if isinstance(exclude, (list, tuple)) else exclude
        layers = config.get("layers_to_transform")
        layers = tuple(layers) if isinstance(layers, (list, tuple)) else layers
        pattern = config.get("layers_pattern")
        pattern = (pattern,) if isinstance(pattern, str) else (tuple(pattern) if pattern else None)
        patterns = {}
        for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            value = config.get(field) or {}
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) and v > 0
                    for k, v in value.items()):
                raise bad(field, "must map module patterns to positive numbers")
            patterns[field] = tuple(value.items())
        return cls(r, float(alpha), targets, exclude, layers, pattern, patterns["rank_pattern"],
                   tuple((k, float(v)) for k, v in patterns["alpha_pattern"]), bool(config.get("use_rslora", False)))

    def targets(self, name: str) -> bool:
        return target_matches(name, self.target_modules, self.layers_to_transform, self.layers_pattern,
                              self.exclude_modules)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.lora_alpha))

    def scale_for(self, name: str) -> float:
        return lora_scale(self.rank_for(name), self.alpha_for(name), self.use_rslora)
