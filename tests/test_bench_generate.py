"""Smoke test of bench/bench_generate.py: a --quick run on a tiny random model writes sane results."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("transformers")
from bench import bench_generate  # noqa: E402


def test_quick_run_writes_consistent_results(tmp_path):
    argv = ["--quick", "--random-config", "tiny", "--out-dir", str(tmp_path)]
    payload = bench_generate.run(argv)

    [jpath] = list(tmp_path.glob("generate_*-quick.json"))
    assert jpath.with_suffix(".md").is_file()
    data = json.loads(jpath.read_text())
    assert data == json.loads(json.dumps(payload))  # what was returned is what was saved

    cfg, eng, hf = data["config"], data["engine"], data["transformers"]
    assert cfg["model"] == "random-tiny" and cfg["quick"] is True
    expected_tokens = cfg["num_prompts"] * cfg["max_tokens"]
    for side in (eng, hf):
        assert side["output_tokens"] == expected_tokens
        assert side["seconds"] > 0 and side["output_tok_s"] > 0
        assert len(side["seconds_all"]) == cfg["repeats"] and side["seconds"] == min(side["seconds_all"])
        assert math.isclose(side["output_tok_s"], expected_tokens / side["seconds"], rel_tol=1e-9)
    assert math.isclose(data["ratio_engine_over_transformers"], eng["output_tok_s"] / hf["output_tok_s"],
                        rel_tol=1e-9)

    # every prompt token computed once (prefix cache reset before the timed run), one output token per pass
    assert eng["tokens_computed"] == cfg["prompt_tokens"] + cfg["num_prompts"] * (cfg["max_tokens"] - 1)
    split = eng["split"]
    assert split["prefill"]["passes"] >= 1 and split["decode"]["passes"] == cfg["max_tokens"] - 1
    assert split["prefill"]["seconds"] + split["decode"]["seconds"] <= eng["seconds"] * 1.001
    assert 0.0 <= data["greedy_agreement"]["exact_match"] <= 1.0

    meta = data["meta"]  # bench.common.write_results: every result file carries these
    for key in ("torch", "transformers", "cpu_model", "cpu_cores", "device_name", "date", "commit", "device"):
        assert meta[key]
    assert meta["command"].startswith("python bench/bench_generate.py --quick")
    assert meta["command"] in jpath.with_suffix(".md").read_text()
    assert len(data["loadavg_before"]) == 3 and len(data["runs"]) == 2 * cfg["repeats"]
    assert jpath.name == f"generate_{meta['device_slug']}-quick.json"


def test_defaults_follow_the_device():
    cpu = bench_generate.parse_args(["--device", "cpu"])
    assert (cpu.model, cpu.random_config, cpu.num_prompts, cpu.max_tokens, cpu.dtype) == (
        "smollm2-135m", None, 32, 64, "float32")
    quick = bench_generate.parse_args(["--device", "cpu", "--quick", "--max-tokens", "5"])
    assert quick.random_config == "tiny" and quick.max_tokens == 5 and quick.num_prompts == 4
    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--model", "smollm2-135m", "--random-config", "tiny"])


def test_prompts_do_not_share_a_cacheable_prefix():
    class Tok:  # byte-level stand-in for a tokenizer
        def encode(self, text, add_special_tokens=True):
            return list(text.encode())

    args = bench_generate.parse_args(["--device", "cpu", "--num-prompts", "70", "--prompt-len", "16", "40"])
    prompts = bench_generate.make_prompts(args, Tok(), 256)
    assert len(prompts) == 70 and all(16 <= len(p) <= 40 for p in prompts)
    heads = {tuple(p[:16]) for p in prompts}
    assert len(heads) == len(prompts)
