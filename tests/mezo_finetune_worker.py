"""Run `Engine.finetune` on the tiny text model in a subprocess (used by test_mezo_resume.py).

    python tests/mezo_finetune_worker.py DATA.jsonl OUT_DIR --steps 10 --tokenizer DIR [--step-delay S]

--tokenizer is a directory written by `tokenizer.save_pretrained` (loading SmolLM2's tokenizer from
its GGUF takes ~10 s; the saved tokenizer.json loads in ~0.1 s and encodes identically).
--step-delay sleeps after every MeZO step so that a test can kill the run mid-way.
Prints "RESUMED_FROM <step|None>" and then "DONE <steps>" on success.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # this checkout's packages, whatever is installed
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def worker_config(steps: int):
    from mezo import MeZOConfig

    return MeZOConfig(lr=1e-2, eps=1e-2, steps=steps, batch_size=4, checkpoint_every=2, eval_every=steps,
                      seed=3)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--step-delay", type=float, default=0.0)
    args = p.parse_args()

    from transformers import AutoTokenizer

    import mezo_fixtures
    from mezo.trainer import MeZOTrainer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    mezo_fixtures.smollm2_tokenizer = lambda: tok  # same vocabulary, fast to load
    engine, _, _ = mezo_fixtures.tiny_text_engine()

    if args.step_delay > 0:
        step = MeZOTrainer.step

        def slow_step(self, examples):
            record = step(self, examples)
            time.sleep(args.step_delay)
            return record

        MeZOTrainer.step = slow_step
    result = engine.finetune(args.data, None, worker_config(args.steps), out_dir=args.out, progress=False)
    print(f"RESUMED_FROM {result.resumed_from}", flush=True)
    print(f"DONE {result.steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
