"""The scenarios, sizes and model references of bench_mezo.py: plain data, cheap to import (the
parent process of the benchmark imports only this; the contestants import bench.mezo_workloads)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.model_shapes import LLAMA_SHAPES

# Random-weight LLaMA shapes for GPU runs. All use SmolLM2's tokenizer, so vocab is 49152.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = LLAMA_SHAPES
VOCAB = 49152
CACHE_ROOT = Path(tempfile.gettempdir()) / "mezo_bench_cache"
FULL_MODE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- scenarios ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    objective: str  # "classification" | "lm"
    mode: str  # "lora" | "full"
    preset: str  # MeZOConfig preset: lr/eps of both sides


SCENARIOS: dict[str, Scenario] = {s.key: s for s in (
    Scenario("cls", "1. BBC headline classification (LoRA)", "classification", "lora", "opt-lora"),
    Scenario("cls_16shot", "2. BBC classification, 16-shot shared prompt (LoRA)", "classification", "lora", "opt-lora"),
    Scenario("lm_256", "3. LM loss, 256-token BBC article windows (LoRA)", "lm", "lora", "opt-lora"),
    Scenario("cls_full", "4. BBC headline classification, full-parameter", "classification", "full", "opt-full"),
)}


@dataclass(frozen=True)
class Sizes:
    batch_size: int = 16
    shots: int = 16
    lm_prompt_tokens: int = 128
    lm_target_tokens: int = 128


@dataclass
class ModelRef:
    """How to (re)build the same transformers model: a built-in name or a random config + seed."""

    model: str | None
    random_config: str | None
    dtype: str
    device: str
    seed: int = 0
    tokenizer_path: str | None = None

    @property
    def label(self) -> str:
        return self.model or f"random-{self.random_config}"

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
