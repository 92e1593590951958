"""The handful of architecture facts the engine needs, read once from a transformers config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a LLaMA-family decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases
    o_proj_bias: bool  # LLaMA's attention_bias also covers o_proj; Qwen2's does not
    mlp_bias: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @classmethod
    def from_hf(cls, config: Any, max_model_len: int | None = None) -> "ModelSpec":
        """Read a transformers config. `max_model_len` (vLLM's name) caps the context below the model's
        max_position_embeddings; ValueError names a field the engine does not implement."""
        model_type = getattr(config, "model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        context = int(getattr(config, "max_position_embeddings", 2048))
        if max_model_len is not None:
            if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
                raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
            if max_model_len > context:
                raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={context}")
            context = max_model_len
        _refuse_unsupported(config, model_type, context)
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v biases; LLaMA exposes it as `attention_bias`.
        attention_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=context,  # the longest sequence the engine runs (max_model_len if set)
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=getattr(config, "bos_token_id", None),
        )


def sliding_window_layers(config: Any, model_type: str) -> tuple[int | None, list[int]]:
    """(window, indices of the layers that use it) as transformers reads the config; (None, []) if none.

    Mistral: `sliding_window` on every layer (None disables it). Qwen2: only with `use_sliding_window`,
    on layers i >= `max_window_layers`. Newer configs list it per layer in `layer_types`.
    """
    if model_type not in ("mistral", "qwen2"):  # transformers' LLaMA has no sliding window
        return None, []
    window = getattr(config, "sliding_window", None)
    if model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        window = None
    if window is None:
        return None, []
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return int(window), [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if model_type == "qwen2":
        return int(window), list(range(int(getattr(config, "max_window_layers", 0) or 0), n))
    return int(window), list(range(n))


def _refuse_unsupported(config: Any, model_type: str, context: int) -> None:
    """Config fields that change the model's function and that the engine does not implement: a
    clear error naming the field, never a silently different model."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (the engine's MLP is SwiGLU with 'silu')")
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        raise ValueError(f"layer_types has {other!r}: only 'full_attention' layers are supported")
    window, layers = sliding_window_layers(config, model_type)
    # a window of W keys covers distances < W; no sequence is longer than `context` tokens, so
    # W >= context is plain causal attention and exact
    if layers and window < context:
        field = "sliding_window" if model_type != "qwen2" else "use_sliding_window/sliding_window"
        raise ValueError(
            f"{field}: sliding_window={window} on {len(layers)} of {config.num_hidden_layers} layers (first: "
            f"{layers[0]}) is smaller than the context ({context} tokens: max_position_embeddings or "
            f"max_model_len); sliding-window attention is not implemented, so this model would attend "
            f"differently from transformers. Pass max_model_len={window} (or less) to run it exactly with a "
            f"context no longer than the window")
