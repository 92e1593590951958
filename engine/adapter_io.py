"""Crash-safe files and PEFT-format LoRA adapters.

These live in the engine (not in `mezo`) because adapters are an inference concern too:
`Engine.load_adapter` serves what `Engine.finetune` or `peft` wrote.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .peft_config import pattern_value, target_matches

PathLike = str | os.PathLike


# ---- atomic writes ----------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write_fn: Callable[[IO[bytes]], None]) -> None:
    """Write via a temp file in the same directory, fsync, rename over ``path``, fsync the dir.
    A crash or exception at any point leaves the old file (or none), never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would follow the umask
        with os.fdopen(fd, "wb") as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(path: PathLike, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(data, metadata=metadata))


# ---- PEFT LoRA adapters -----------------------------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight$")


def normalize_peft_key(key: str) -> str:
    """``[base_model.model.]<module>.lora_A[.<adapter>].weight`` -> the PEFT file form
    ``base_model.model.<module>.lora_A.weight`` (PEFT drops the adapter name when saving)."""
    m = _LORA_KEY.match(key)
    if m is None:
        raise ValueError(f"not a LoRA weight key: {key!r} (expected '<module>.lora_A.weight' or '.lora_B.weight')")
    module = m["module"]
    if not module.startswith(_PEFT_PREFIX):
        module = _PEFT_PREFIX + module
    return f"{module}.{m['ab']}.weight"


_CONFIG_META = "adapter_config"  # safetensors metadata: the config written with these weights
_FUNCTION_FIELDS = ("r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
                    "alpha_pattern", "use_rslora", "use_dora", "bias", "modules_to_save", "exclude_modules")


def save_peft_adapter(path: PathLike, tensors: dict[str, torch.Tensor], *, r: int, alpha: float,
                      target_modules: list[str] | tuple[str, ...], base_model_name_or_path: str,
                      layers_to_transform: list[int] | tuple[int, ...] | None = None,
                      rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                      use_rslora: bool = False) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained`` loads (A is [r_m, in], B is [out, r_m], delta = B@A·scale_m, with
    r_m / alpha_m from ``rank_pattern`` / ``alpha_pattern`` by PEFT's rule, scale_m = alpha_m/r_m or
    alpha_m/sqrt(r_m) with ``use_rslora``). Each file is written atomically, and the weights carry a
    copy of the config in their metadata so that a pair torn by a crash between the two renames is
    detected on load. ValueError for tensors that do not fit the config."""
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        out[normalize_peft_key(k)] = v.detach().to(torch.float32)
    modules = {k.rsplit(".", 2)[0] for k in out}
    for mod in sorted(modules):
        name = mod[len(_PEFT_PREFIX):]
        rank = int(pattern_value(tuple(rank_pattern.items()), name, r))
        a, b = out.get(f"{mod}.lora_A.weight"), out.get(f"{mod}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{mod}: LoRA needs both lora_A and lora_B")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{mod}: lora_A {tuple(a.shape)} must be [r={rank}, in], lora_B {tuple(b.shape)} [out, r={rank}]")
        if not target_matches(name, list(target_modules), layers_to_transform):
            raise ValueError(f"{mod}: module not in target_modules {list(target_modules)} (layers {layers_to_transform})")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted(target_modules), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "layers_to_transform": list(layers_to_transform) if layers_to_transform is not None else None,
        "layers_pattern": None, "modules_to_save": None, "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_rslora": bool(use_rslora), "use_dora": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", _CONFIG_META: json.dumps(config, sort_keys=True)}
    atomic_save_safetensors(path / ADAPTER_WEIGHTS, out, metadata=meta)
    atomic_write_json(path / ADAPTER_CONFIG, config)


def load_peft_adapter(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter (ours or PEFT's); keys normalised to ``base_model.model.<module>.lora_X.weight``.

    ValueError if a file is missing, unreadable (torn), or, for adapters this engine wrote, if the
    config is not the one written with the weights (a save interrupted between its two files)."""
    path = Path(path)
    cfg_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise ValueError(f"{path}: not a PEFT adapter (need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON (torn or corrupt file?): {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{path}: peft_type {peft_type!r} is not LORA")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{weights}: unreadable safetensors file (torn or corrupt?): {e}") from None
    if _CONFIG_META in meta:
        saved = json.loads(meta[_CONFIG_META])
        changed = sorted(k for k in _FUNCTION_FIELDS if saved.get(k) != config.get(k))
        if changed:
            raise ValueError(f"{path}: {ADAPTER_CONFIG} differs in {changed} from the config saved with "
                             f"{ADAPTER_WEIGHTS} (a save interrupted between the two files, or an edit); "
                             "save the adapter again")
    return {normalize_peft_key(k): v for k, v in tensors.items()}, config
