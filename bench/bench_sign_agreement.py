"""Does a bf16 engine estimate the same MeZO gradient direction as fp32? Sign agreement of g.

For --seeds step seeds, the projected gradient g = (L+ − L−) / 2ε of one batch is computed by an fp32
engine and by a bf16 engine over the same weights and adapter (LoRA B made nonzero, so both LoRA
factors matter); the figure is the share of seeds where the signs agree (GPU target >= 0.9). Random
weights and synthetic token ids (bench/mezo_workloads.py), so it runs on any machine.

    python bench/bench_sign_agreement.py --random-config 1b --device cuda    # GPU suite
    python bench/bench_sign_agreement.py --quick                              # tiny, CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import mezo_workloads as w  # noqa: E402
from bench.common import resolve_device, write_results  # noqa: E402


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-config", default=None, help="LLaMA shape (default: 1b on GPU, tiny on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seeds", type=int, default=None, help="default 64 (--quick 4)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    shape = args.random_config or ("1b" if dev.type == "cuda" and not args.quick else "tiny")
    seeds = args.seeds or (4 if args.quick else 64)
    scenario = w.SCENARIOS["cls"]
    tok = w.load_tokenizer("synthetic")
    examples = w.build_examples(scenario, w.Sizes(batch_size=args.batch_size), tok)
    hf = w.build_hf_model(w.ModelRef(None, shape, "float32", str(dev)))
    trainers = {}
    for dtype in ("float32", "bfloat16"):
        ref = w.ModelRef(None, shape, dtype, str(dev))
        trainers[dtype], encoded = w.build_engine(hf, tok, ref, scenario, examples)
    g = torch.Generator().manual_seed(0)
    lora = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v.detach().cpu().clone())
            for k, v in trainers["float32"].params.items()}
    for t in trainers.values():
        t.engine.set_trainable(lora)
    eps = trainers["float32"].config.eps
    grads: dict[str, list[float]] = {k: [] for k in trainers}
    for s in range(seeds):
        for dtype, t in trainers.items():
            lp, lm = t.branch_losses(encoded, seed=1000 + s)
            grads[dtype].append(float((lp - lm) / (2 * eps)))
    agree = sum((a > 0) == (b > 0) for a, b in zip(grads["float32"], grads["bfloat16"])) / seeds
    payload = {"model": f"random-{shape}", "batch_size": args.batch_size, "seeds": seeds, "eps": eps,
               "projected_grads": grads, "figures": {"bf16_sign_agreement": agree}}
    md = (f"random-{shape}, B = {args.batch_size}, eps {eps}, {seeds} seeds: the sign of g agrees between bf16 "
          f"and fp32 on **{agree:.1%}** of seeds.")
    write_results("sign_agreement" + ("-quick" if args.quick else ""), payload, md,
                  title="MeZO estimator: bf16 vs fp32 sign agreement", device=dev, script=__file__, argv=argv,
                  out_dir=args.out_dir)
    print(md)
    return payload


if __name__ == "__main__":
    run()
