"""Example loading: sources, validation messages, the fixed bbc_news split, length checks."""
import json
from collections import Counter

import pytest

from mezo.data import (BBC_CANDIDATES, ClassificationExample, LMExample, bbc_news_rows, load_examples,
                       validate_lengths)

CLS = {"prompt": "Review: great\nSentiment:", "candidates": [" bad", " good"], "label": 1}
LM = {"prompt": "Q: 2+2?\nA:", "target": " 4"}


def test_list_of_dicts_and_examples():
    exs = load_examples([CLS, ClassificationExample("p", [" a", " b"], 0)], "classification")
    assert exs[0] == ClassificationExample(CLS["prompt"], [" bad", " good"], 1)
    assert load_examples([LM], "lm") == [LMExample(LM["prompt"], " 4")]
    assert load_examples([LM], "f1")[0].target == " 4"


def test_jsonl_file_and_limit(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({**CLS, "extra": i}) for i in range(5)) + "\n\n")
    assert len(load_examples(str(f), "classification")) == 5
    assert len(load_examples(f, "classification", limit=2)) == 2


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(CLS) + "\n" + json.dumps(CLS) + "\n{\"prompt\": \"x\",\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_examples(f, "classification")


def test_jsonl_missing_key_names_file_line_and_key(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(CLS) + "\n" + json.dumps({"prompt": "x", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing required key 'candidates'"):
        load_examples(f, "classification")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: missing required key 'target'"):
        load_examples(f, "lm")


@pytest.mark.parametrize("row,msg", [
    ({**CLS, "prompt": ""}, "example 1: 'prompt' must be a non-empty string"),
    ({**CLS, "prompt": "   "}, "example 1: 'prompt' must be a non-empty string"),
    ({**CLS, "candidates": []}, "example 1: 'candidates' must be a list of at least 2"),
    ({**CLS, "candidates": " good"}, "example 1: 'candidates' must be a list"),
    ({**CLS, "candidates": [" a", ""]}, "example 1: candidate 1 must be a non-empty string"),
    ({**CLS, "label": 2}, "example 1: label 2 out of range for 2 candidates"),
    ({**CLS, "label": -1}, "example 1: label -1 out of range"),
    ({**CLS, "label": "1"}, "example 1: 'label' must be an int"),
    ({**CLS, "label": True}, "example 1: 'label' must be an int"),
    ("not a dict", "example 1: expected a dict"),
])
def test_bad_classification_rows(row, msg):
    with pytest.raises(ValueError, match=msg):
        load_examples([CLS, row], "classification")


def test_bad_lm_rows_and_arguments():
    with pytest.raises(ValueError, match="example 0: 'target' must be a non-empty string"):
        load_examples([{**LM, "target": ""}], "lm")
    with pytest.raises(ValueError, match="objective='regression'"):
        load_examples([LM], "regression")
    with pytest.raises(ValueError, match="neither a file nor a built-in task"):
        load_examples("no_such_task", "classification")
    with pytest.raises(ValueError, match="no examples"):
        load_examples([], "lm")


class FakeDataset:
    """Duck-typed stand-in for datasets.Dataset: iterable of dicts."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_dataset_like_and_split_mapping():
    assert len(load_examples(FakeDataset([CLS, CLS]), "classification")) == 2
    splits = {"train": FakeDataset([CLS] * 3), "test": [CLS]}
    assert len(load_examples(splits, "classification", split="test")) == 1
    with pytest.raises(ValueError, match="not 'validation'"):
        load_examples(splits, "classification", split="validation")


def test_bbc_news_split_sizes_and_determinism():
    train, test = bbc_news_rows("train"), bbc_news_rows("test")
    assert (len(train), len(test)) == (1725, 500)
    ids_train, ids_test = {r["id"] for r in train}, {r["id"] for r in test}
    assert len(ids_train | ids_test) == 2225 and not ids_train & ids_test
    assert [r["id"] for r in bbc_news_rows("test")] == [r["id"] for r in test]  # fixed order
    assert Counter(r["label"] for r in test) == {0: 106, 1: 86, 2: 102, 3: 119, 4: 87}  # as documented
    assert test[0]["id"] == "politics/188.txt"  # pins the split (seed 1234) across versions


def test_bbc_news_examples():
    exs = load_examples("bbc_news", "classification", split="test", limit=10)
    assert len(exs) == 10 and all(e.candidates == BBC_CANDIDATES for e in exs)
    assert exs[0].prompt.startswith("Headline: ") and exs[0].prompt.endswith("\nTopic:")
    assert exs[0].candidates[exs[0].label] == " politics"
    lead = load_examples("bbc_news", "classification", split="test", limit=1, bbc_prompt="headline_lead")
    assert "\nLead: " in lead[0].prompt and len(lead[0].prompt.split()) < 40
    gen = load_examples("bbc_news", "accuracy", split="test", limit=1)
    assert gen[0] == LMExample(exs[0].prompt, " politics")
    with pytest.raises(ValueError, match="split='dev'"):
        load_examples("bbc_news", "classification", split="dev")


def test_validate_lengths():
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer
    cls = [ClassificationExample("a b c", [" d", " e f g"], 0)]
    validate_lengths(cls, words, 6)
    with pytest.raises(ValueError, match="example 0: prompt\\+candidate 1 is 6 tokens > max_length 5"):
        validate_lengths(cls, words, 5)
    lm = [LMExample("a", " b"), LMExample("a b c", " d e")]
    with pytest.raises(ValueError, match="example 1: prompt\\+target is 5 tokens > max_length 4"):
        validate_lengths(lm, words, 4)
    with pytest.raises(ValueError, match="example 1: prompt \\+ max_new_tokens 2 is 5 tokens"):
        validate_lengths(lm, words, 4, max_new_tokens=2)
