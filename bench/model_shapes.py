"""Random-weight LLaMA shapes for the GPU benchmarks (plain data, cheap to import). Each benchmark
adds its own vocabulary size and context length."""
from __future__ import annotations

from typing import Any

LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    # SmolLM2-135M's shape
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3.2-1B's shape (~1.24B parameters with its own vocabulary)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B's shape (~6.7B parameters with its own vocabulary)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0),
}
