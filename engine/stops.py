"""Detokenization and stop strings, with vLLM's rules, including stop strings made of special tokens.

A request's text is its output ids decoded (special tokens skipped unless `skip_special_tokens=False`).
A stop string ends the request as soon as it appears; the returned text ends right before it (or
after it with `include_stop_str_in_output`), the token ids keep every generated token.

Special tokens such as ChatML's "<|im_end|>" never appear in a text decoded with
`skip_special_tokens=True`, so matching only that text never sees them. Here:
- a stop string that IS one special token also matches that token's id (and its spelled-out text);
- a stop string that CONTAINS special tokens is matched in the text decoded with special tokens shown;
  the returned text is that text, cut as above, with the special tokens' strings then removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .request import Request


@dataclass(frozen=True)
class StopRules:
    """How a request's `stop` strings are matched (built once per request)."""

    token_stops: dict[int, str]  # special token id -> the stop string that is exactly that token
    text_stops: tuple[str, ...]  # matched in the returned text
    shown_stops: tuple[str, ...]  # contain special tokens: matched in the text with special tokens shown


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """{content: id} of every special token the tokenizer skips when decoding (added special tokens too)."""
    if tokenizer is None:
        return {}
    out: dict[str, int] = {}
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False) and str(added):
            out[str(added)] = int(tid)
    # a minimal tokenizer (encode/decode only) has no special tokens to match
    for content, tid in zip(getattr(tokenizer, "all_special_tokens", ()), getattr(tokenizer, "all_special_ids", ())):
        if content and tid is not None:
            out.setdefault(content, int(tid))
    return out


def stop_rules(stop: Sequence[str], skip_special_tokens: bool, specials: dict[str, int]) -> StopRules:
    token_stops = {specials[s]: s for s in stop if s in specials}
    text, shown = [], []
    for s in stop:
        # with special tokens skipped, a string holding one can only be found in the shown text
        if skip_special_tokens and s not in specials and any(sp in s for sp in specials):
            shown.append(s)
        else:
            text.append(s)  # a special token's own string: also matched if spelled by ordinary tokens
    return StopRules(token_stops, tuple(text), tuple(shown))


def _earliest(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for s in stops:
        cut = text.find(s)
        if cut >= 0 and (best is None or cut < best[0]):
            best = (cut, s)
    return best


def _remove_specials(text: str, specials: dict[str, int]) -> str:
    for sp in sorted(specials, key=len, reverse=True):  # longest first: no token is cut by a shorter one
        text = text.replace(sp, "")
    return text


def update_text(req: Request, tokenizer: Any, specials: dict[str, int]) -> None:
    """Re-decode `req.text` after a new output token and apply the stop strings (sets finish_reason
    "stop" and stop_reason to the matched string)."""
    p, out = req.params, req.output_ids
    rules = req.stop_rules
    if rules is None:
        rules = req.stop_rules = stop_rules(p.stop, p.skip_special_tokens, specials)
    keep = p.include_stop_str_in_output
    if out and out[-1] in rules.token_stops:
        s = rules.token_stops[out[-1]]
        text = tokenizer.decode(out[:-1], skip_special_tokens=p.skip_special_tokens)
        req.text = text + (s if keep else "")
        req.finish_reason, req.stop_reason = "stop", s
        return
    text = tokenizer.decode(out, skip_special_tokens=p.skip_special_tokens)
    match = _earliest(text, rules.text_stops)
    if match is None and rules.shown_stops:
        shown = tokenizer.decode(out, skip_special_tokens=False)
        found = _earliest(shown, rules.shown_stops)
        if found is not None:
            cut, s = found
            req.text = _remove_specials(shown[: cut + (len(s) if keep else 0)], specials)
            req.finish_reason, req.stop_reason = "stop", s
            return
    if match is not None:
        cut, s = match
        text = text[: cut + (len(s) if keep else 0)]
        req.finish_reason, req.stop_reason = "stop", s
    req.text = text
