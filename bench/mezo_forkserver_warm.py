"""Imported once by bench_mezo's forkserver (never by anything else): warms what every contestant
process would otherwise load again after its fork (lazy transformers/peft modules, the tokenizer,
the BBC corpus), so starting a contestant costs little more than building its model."""
from __future__ import annotations

import peft.tuners.lora  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

from bench import mezo_workloads
from mezo.data import bbc_news_rows

try:
    mezo_workloads.load_tokenizer(None)
    bbc_news_rows("train")
    mezo_workloads._bbc_train_articles()
except Exception:  # noqa: BLE001 - warming is best effort; the contestant reports real errors itself
    pass
