"""A small offline word-level tokenizer for tests: id i is the word "w{i}" unless overridden.

Ids 0, 1, 2 are the special <pad>, <s> (BOS), </s> (EOS). `overrides` renames ids (and can make
them special), so a test can give a token the model is known to produce a chosen string. With
`add_bos=True` the post-processor prepends BOS (as the Llama-3 / Mistral tokenizers do).
"""
from __future__ import annotations


def tiny_tokenizer(vocab: int = 256, overrides: dict[int, tuple[str, bool]] | None = None,
                   add_bos: bool = True, chat_template: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    overrides = dict(overrides or {})
    words = {0: ("<pad>", True), 1: ("<s>", True), 2: ("</s>", True)}
    words.update(overrides)
    table = {words.get(i, (f"w{i}", False))[0]: i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<pad>"))
    tok.add_special_tokens([w for w, is_special in words.values() if is_special])  # skipped by decode
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
