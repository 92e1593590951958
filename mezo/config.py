"""MeZO hyper-parameters, validated up front, with the paper's settings as named presets.

Every preset is named after its source: Malladi et al. 2023, Tables 15/16, and the scripts of
princeton-nlp/MeZO (``large_models/mezo.sh`` for OPT, ``medium_models/mezo.sh`` for RoBERTa-large).
The paper's grids are offered as one preset per learning rate. RoBERTa's LoRA targets are
``query``/``value``; on LLaMA the same attention projections are ``q_proj``/``v_proj``.

There is no prefix-tuning preset: the paper's "MeZO (prefix)" rows (lr 1e-2/1e-3, eps 1e-1) tune
prefix key/value vectors, which this engine does not implement; mapping those values onto LoRA
would be a different, untested method wearing the paper's name.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("constant", "linear", "cosine")
MODES = ("lora", "full")
OBJECTIVES = ("classification", "lm", "accuracy", "f1")
DTYPES = ("float32", "bfloat16", "float16")
ESTIMATORS = ("spsa", "one_sided", "per_example")  # mezo/estimators.py implements them
SHARD_BALANCES = ("tokens", "throughput")  # data-parallel shards (mezo/distributed.py)
# fields that never change the update, so a resumed run may differ in them from its checkpoint
RESUME_FREE_FIELDS = ("shard_balance",)
MAX_PER_EXAMPLE_BATCH = 2**10  # per_example: one sample seed per example, k < 2**10 (mezo/seeds.py)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class MeZOConfig:
    """One MeZO run. The defaults are the ``opt-lora`` preset (MeZO LoRA on OPT).

    ``eval_every`` None means steps // 5 (the paper evaluates 5 times a run); ``checkpoint_every``
    None means ``eval_every`` (the scripts save at every evaluation). Both are resolved to ints in
    ``__post_init__``, so ``dataclasses.replace(cfg, steps=...)`` keeps the old interval: pass
    ``eval_every=None`` again to re-derive it. ``dtype`` is the base weights' dtype; trainable
    tensors and noise arithmetic stay fp32 regardless (DESIGN §4).

    ``shard_balance`` matters only under torch.distributed (mezo/distributed.py): "tokens" splits each
    step's batch by estimated tokens, the same split in every run (bitwise reproducible); "throughput"
    also weights each rank by its measured tokens/s over the previous steps, so that a slower rank (a
    busy core, a smaller GPU) gets fewer examples. The update is the same up to fp32 rounding either
    way (an example's loss can differ in its last bits with the launch it runs in), but the throughput
    split depends on timing, so two such runs are not bit-identical: they agree as a run on another world
    size does (within 1e-6 over a few steps, tested; rounding differences can grow over long runs).
    """

    lr: float = 1e-4
    eps: float = 1e-2
    steps: int = 20_000
    batch_size: int = 16
    n_spsa: int = 1
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    mode: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: tuple[int, ...] | None = None
    objective: str = "classification"
    max_length: int = 2048
    max_new_tokens: int = 50
    eval_every: int | None = None
    eval_size: int | None = 500
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    seed: int = 0
    max_nonfinite: int = 5
    dtype: str = "float32"
    estimator: str = "spsa"
    one_sided_std_scaling: bool = False
    one_sided_std_floor: float = 1e-6
    normalize_perturbations: bool = False
    per_example_group_relative: bool = True
    shard_balance: str = "tokens"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"MeZOConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("lr", "eps"):
            if not _is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise bad(name, "must be a finite number > 0")
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "must be a finite number >= 0")
        if not _is_real(self.lora_alpha) or self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be a finite number > 0")
        for name in ("steps", "batch_size", "n_spsa", "lora_rank", "max_length", "max_nonfinite"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an int >= 1")
        # the noise seeds give every (step, SPSA sample) of a run its own streams up to these (mezo/seeds.py)
        if self.steps > 2**32:
            raise bad("steps", "must be <= 2**32 (noise seeds are distinct for steps < 2**32)")
        if self.n_spsa > 2**10:
            raise bad("n_spsa", "must be <= 1024 (noise seeds are distinct for SPSA samples < 2**10)")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "must be an int >= 0")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad("seed", "must be an int in [0, 2**63)")
        for name, choices in (("lr_schedule", SCHEDULES), ("mode", MODES),
                              ("objective", OBJECTIVES), ("dtype", DTYPES), ("shard_balance", SHARD_BALANCES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"must be one of {choices}")
        if self.estimator not in ESTIMATORS:
            raise bad("estimator", f"unknown estimator; choose one of {ESTIMATORS}")
        for name in ("one_sided_std_scaling", "normalize_perturbations", "per_example_group_relative"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if not _is_real(self.one_sided_std_floor) or self.one_sided_std_floor <= 0:
            raise bad("one_sided_std_floor", "must be a finite number > 0")
        if self.one_sided_std_scaling and (self.estimator != "one_sided" or self.n_spsa < 2):
            raise bad("one_sided_std_scaling", f"needs estimator='one_sided' and n_spsa >= 2 (the std of the "
                                               f"perturbed losses), got estimator={self.estimator!r}, "
                                               f"n_spsa={self.n_spsa}")
        if self.estimator == "per_example":
            if self.n_spsa != 1:
                raise bad("n_spsa", "must be 1 with estimator='per_example' (each example of the batch is one "
                                    "perturbation: the step draws batch_size of them)")
            if self.batch_size > MAX_PER_EXAMPLE_BATCH:
                raise bad("batch_size", f"must be <= {MAX_PER_EXAMPLE_BATCH} with estimator='per_example' (one "
                                        f"noise seed per example; seeds are distinct for samples < 2**10)")
            if self.per_example_group_relative and self.batch_size < 2:
                raise bad("batch_size", "must be >= 2 with estimator='per_example' and "
                                        "per_example_group_relative=True (GRZO divides by the std over the batch); "
                                        "set per_example_group_relative=False for plain per-example SPSA")
        if self.objective in ("accuracy", "f1") and self.max_new_tokens < 1:
            raise bad("max_new_tokens", f"must be >= 1 for the generation objective {self.objective!r}")

        if isinstance(self.lora_target_modules, str) or not isinstance(self.lora_target_modules, (list, tuple)):
            raise bad("lora_target_modules", "must be a list/tuple of module names, e.g. ('q_proj', 'v_proj')")
        self.lora_target_modules = tuple(self.lora_target_modules)
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise bad("lora_target_modules", "must be a non-empty tuple of non-empty strings")
        if len(set(self.lora_target_modules)) != len(self.lora_target_modules):
            raise bad("lora_target_modules", "has duplicates")
        if self.lora_layers is not None:
            if not isinstance(self.lora_layers, (list, tuple)):
                raise bad("lora_layers", "must be None (all layers) or a list/tuple of layer indices")
            self.lora_layers = tuple(self.lora_layers)
            if not self.lora_layers or not all(_is_int(i) and i >= 0 for i in self.lora_layers):
                raise bad("lora_layers", "must be a non-empty tuple of ints >= 0 (None = all layers)")
            if len(set(self.lora_layers)) != len(self.lora_layers):
                raise bad("lora_layers", "has duplicates")

        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 5)
        if not _is_int(self.eval_every) or self.eval_every < 1:
            raise bad("eval_every", "must be an int >= 1 (or None for steps // 5)")
        if self.eval_size is not None and (not _is_int(self.eval_size) or self.eval_size < 1):
            raise bad("eval_size", "must be an int >= 1 or None (the whole eval set)")
        if self.checkpoint_dir is not None and (not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise bad("checkpoint_dir", "must be None or a non-empty path string")
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            raise bad("checkpoint_every", "must be an int >= 1 (or None for eval_every)")

    # ---- schedule -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate of the update made at 0-based ``step`` (HF schedulers, no warm-up)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"lr_at: step={step!r} must be an int >= 0")
        frac = min(step, self.steps) / self.steps
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - frac)
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.lr

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        if self.lora_layers is not None:
            d["lora_layers"] = list(self.lora_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MeZOConfig":
        """Inverse of ``to_dict``; unknown keys are an error so a stale checkpoint is not misread."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"MeZOConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    # ---- presets --------------------------------------------------------------------------
    @classmethod
    def presets(cls) -> list[str]:
        return sorted(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MeZOConfig":
        """The named paper setting with ``overrides`` applied.

        Overriding ``steps`` re-derives ``eval_every`` (and ``checkpoint_every``) from the preset's
        evaluation fraction unless they are overridden too.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown MeZO preset {name!r}; available: {cls.presets()}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"MeZOConfig.preset({name!r}): unknown fields {unknown}")
        values, evals_per_run = _PRESETS[name]
        values = {**values, **overrides}
        if "eval_every" not in overrides:
            values["eval_every"] = max(1, values.get("steps", 20_000) // evals_per_run)
        return cls(**values)


_OPT = dict(batch_size=16, steps=20_000, lr_schedule="constant", weight_decay=0.0)
_ROBERTA = dict(batch_size=64, steps=100_000, lr_schedule="constant")
_LORA = dict(mode="lora", lora_rank=8, lora_alpha=16, lora_target_modules=("q_proj", "v_proj"))

# name -> (field values, evaluations per run). OPT: Table 16 + large_models/mezo.sh
# (EVAL_STEPS 4000 of 20000). RoBERTa-large: Table 15 + medium_models/mezo.sh (EVAL_STEP 10000 of 100000).
_PRESETS: dict[str, tuple[dict[str, Any], int]] = {
    "opt-lora": ({**_OPT, **_LORA, "lr": 1e-4, "eps": 1e-2}, 5),
    "opt-lora-5e-5": ({**_OPT, **_LORA, "lr": 5e-5, "eps": 1e-2}, 5),
    "opt-full": ({**_OPT, "mode": "full", "lr": 1e-6, "eps": 1e-3}, 5),
    "opt-full-1e-7": ({**_OPT, "mode": "full", "lr": 1e-7, "eps": 1e-3}, 5),
    "roberta-full": ({**_ROBERTA, "mode": "full", "lr": 1e-6, "eps": 1e-3, "weight_decay": 0.0}, 10),
    "roberta-full-1e-7": ({**_ROBERTA, "mode": "full", "lr": 1e-7, "eps": 1e-3, "weight_decay": 0.0}, 10),
    "roberta-full-1e-5": ({**_ROBERTA, "mode": "full", "lr": 1e-5, "eps": 1e-3, "weight_decay": 0.0}, 10),
    "roberta-lora": ({**_ROBERTA, **_LORA, "lr": 1e-4, "eps": 1e-3, "weight_decay": 0.1}, 10),
    "roberta-lora-5e-5": ({**_ROBERTA, **_LORA, "lr": 5e-5, "eps": 1e-3, "weight_decay": 0.1}, 10),
    "roberta-lora-1e-5": ({**_ROBERTA, **_LORA, "lr": 1e-5, "eps": 1e-3, "weight_decay": 0.1}, 10),
}
