"""Checks on user input that name the offending field and value."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .engine import Engine


def validate_prompt(prompt: Any, engine: "Engine", field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
    """Token ids of a str or list-of-ids prompt, or TypeError/ValueError."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{field} is empty ({prompt!r})")
        if engine.tokenizer is None:
            raise ValueError(f"{field} is a string but the engine has no tokenizer; pass token ids")
        ids = list(engine.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        if not ids:
            raise ValueError(f"{field} {prompt!r} encodes to no tokens")
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        ids = list(prompt)
        if not ids:
            raise ValueError(f"{field} is empty ([])")
        for tok in ids:
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise TypeError(f"{field} token ids must be ints, got {type(tok).__name__} ({tok!r})")
    else:
        raise TypeError(f"{field} must be a str or a list of token ids, got {type(prompt).__name__}")
    vocab = engine.spec.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{field} has token id {bad[0]} outside the vocabulary [0, {vocab})")
    limit = engine.spec.max_position_embeddings
    if len(ids) >= limit:
        raise ValueError(f"{field} has {len(ids)} tokens; the model's context is {limit} (prompt must be shorter)")
    return ids


def attach_completions(err: Exception, completions: list) -> Exception:
    """The results of the whole call ride on the raised error, so good requests are not lost."""
    err.completions = completions  # type: ignore[attr-defined]
    return err
