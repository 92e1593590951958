"""Engine methods for adapters and trainable tensors (kept apart from generation)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .adapter_io import PathLike, load_peft_adapter, save_peft_adapter
from .adapters import (PEFT_PREFIX, LoraSpec, attach_lora, describe_modules, detach_all, enable_full,
                       load_lora_tensors, restore_on_error, trainable_tensors)
from .peft_config import PeftLoraConfig


class AdapterMixin:
    """`add_lora`, `save_adapter`, `load_adapter`, `trainable_parameters` for `Engine`."""

    lora_spec: LoraSpec | None = None
    full_finetuning: bool = False

    def add_lora(self, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                 layers: Sequence[int] | None = None, seed: int = 0, *, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, use_rslora: bool = False) -> dict[str, torch.Tensor]:
        """Attach a fresh LoRA adapter (PEFT init: B = 0) and return its trainable tensors.

        ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora`` mean what they mean in `peft.LoraConfig`
        (per-module r and alpha by PEFT's pattern rule; scale alpha/sqrt(r)). ValueError for bad values."""
        spec = LoraSpec(r, float(alpha), tuple(target_modules), tuple(layers) if layers is not None else None,
                        tuple((rank_pattern or {}).items()), tuple((k, float(v)) for k, v in (alpha_pattern or {}).items()),
                        bool(use_rslora))
        with restore_on_error(self.model):
            attach_lora(self.model, spec, seed)
        self.lora_spec, self.full_finetuning = spec, False
        self.weights_changed()
        return self.trainable_parameters()

    def enable_full_finetuning(self) -> dict[str, torch.Tensor]:
        """Make every decoder projection weight a trainable fp32 tensor (full-parameter MeZO)."""
        enable_full(self.model)
        self.lora_spec, self.full_finetuning = None, True
        self.weights_changed()
        return self.trainable_parameters()

    def remove_adapter(self) -> None:
        detach_all(self.model)
        self.lora_spec, self.full_finetuning = None, False
        self.weights_changed()

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Live trainable tensors (modify in place, then call `weights_changed`), keyed by PEFT names."""
        return trainable_tensors(self.model)

    def set_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy values into the trainable tensors (same keys and shapes)."""
        live = self.trainable_parameters()
        missing, unexpected = set(live) - set(tensors), set(tensors) - set(live)
        if missing or unexpected:
            raise ValueError(f"set_trainable: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        for k, t in live.items():  # every shape is checked before anything is copied
            if tuple(tensors[k].shape) != tuple(t.shape):
                raise ValueError(f"set_trainable: {k} has shape {tuple(tensors[k].shape)}, the engine's is {tuple(t.shape)}")
        try:
            for k, t in live.items():
                t.copy_(tensors[k])
        finally:
            self.weights_changed()  # even a copy that failed part-way changed the weights

    def weights_changed(self) -> None:
        """KV computed under the old weights must never be reused: new namespace, empty cache."""
        self.namespace = ("weights", id(self), getattr(self, "_version", 0) + 1)
        self._version = self.namespace[2]
        self.cache.reset()

    def save_adapter(self, path: PathLike) -> None:
        """Write the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors)."""
        if self.lora_spec is None:
            raise ValueError("no LoRA adapter to save: call add_lora() or load_adapter() first")
        spec = self.lora_spec
        targets = list(spec.target_modules)
        save_peft_adapter(path, self.trainable_parameters(), r=spec.r, alpha=spec.alpha, target_modules=targets,
                          base_model_name_or_path=str(self.model_name), layers_to_transform=spec.layers,
                          rank_pattern=dict(spec.rank_pattern), alpha_pattern=dict(spec.alpha_pattern),
                          use_rslora=spec.use_rslora)

    def load_adapter(self, path: PathLike) -> LoraSpec:
        """Load a PEFT-format LoRA adapter (ours or one `peft` wrote) into the engine.

        Honours r, lora_alpha, rank_pattern, alpha_pattern, use_rslora, target_modules (names or a
        regex), exclude_modules, layers_to_transform and layers_pattern exactly as PEFT does; refuses
        (ValueError naming the field) DoRA, bias != 'none', lora_bias, modules_to_save, base-changing
        inits (PiSSA, OLoRA, CorDA, LoftQ) and unknown non-empty fields, and an adapter whose weights
        do not cover exactly the modules its config targets. On error the engine keeps the adapter it had."""
        tensors, config = load_peft_adapter(path)
        cfg = PeftLoraConfig.parse(config, where=f"{path}/adapter_config.json")
        in_file = {k[len(PEFT_PREFIX):].rsplit(".", 2)[0] for k in tensors}
        targeted = {name for name in self.model.linears() if cfg.targets(name)}
        if in_file - targeted or targeted - in_file:
            missing, extra = sorted(targeted - in_file), sorted(in_file - targeted)
            raise ValueError(f"{path}: adapter_config.json targets do not match the weights file: "
                             f"targeted but without weights {missing[:4]}, weights but not targeted {extra[:4]}")
        try:
            with restore_on_error(self.model):  # a bad file leaves the current adapter as it was
                modules = load_lora_tensors(self.model, tensors, cfg.scale_for, cfg.rank_for)
        finally:
            self.weights_changed()
        targets, layers = describe_modules(self.model, modules)
        self.lora_spec = LoraSpec(cfg.r, cfg.lora_alpha, targets, layers, tuple((k, int(v)) for k, v in cfg.rank_pattern),
                                  cfg.alpha_pattern, cfg.use_rslora)
        self.full_finetuning = False
        self.weights_changed()
        return self.lora_spec

    def finetune(self, train: Any, eval: Any = None, config: Any = None, out_dir: PathLike | None = None,
                 progress: bool = True) -> Any:
        """MeZO fine-tuning of this engine's adapter (see `mezo.finetune`); returns a `TrainResult`.

        The one place where the engine reaches into `mezo`, lazily, so that inference never needs it.
        """
        from mezo.finetune import finetune

        return finetune(self, train, eval, config, out_dir=out_dir, progress=progress)

    def adapter_info(self) -> dict[str, Any]:
        n = sum(t.numel() for t in self.trainable_parameters().values())
        return {"lora": self.lora_spec, "full": self.full_finetuning, "trainable_numel": n}
