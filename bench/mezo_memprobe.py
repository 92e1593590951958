"""Where does a MeZO step's resident memory go? A diagnostic companion of bench_mezo.py (CPU, Linux).

Runs N engine MeZO steps (or N plain forwards of the same 2xB requests) of one bench_mezo scenario
in this process and prints, per call: RSS before, peak RSS (VmHWM reset before the call), RSS after,
and the bytes held by the torch path's noise memo (kernels.noise_cache); then the live tensors over
16 MiB and the RSS after malloc_trim(0). Comparing runs with and without a fixed glibc mmap threshold
separates memory the engine holds from memory glibc keeps after it was freed:

    python bench/mezo_memprobe.py lm_256 step 3
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/mezo_memprobe.py lm_256 step 3
    python bench/mezo_memprobe.py lm_256 forward 3
    python bench/mezo_memprobe.py cls_full step 3
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import mezo_workloads as w  # noqa: E402
from bench.mezo_worker import _noise_cache_bytes, _status_bytes  # noqa: E402

MB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=list(w.SCENARIOS))
    ap.add_argument("what", choices=["step", "forward"])
    ap.add_argument("calls", type=int, nargs="?", default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref = w.ModelRef(args.model, None, "float32", "cpu")
    tok = w.load_tokenizer(None)
    scenario = w.SCENARIOS[args.scenario]
    examples = w.build_examples(scenario, w.Sizes(), tok)
    hf = w.build_hf_model(ref)
    trainer, encoded = w.build_engine(hf, tok, ref, scenario, examples)
    del hf
    gc.collect()
    rss = lambda: _status_bytes("VmRSS") / MB  # noqa: E731
    for i in range(args.calls):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = rss()
        trainer.step(encoded) if args.what == "step" else w.plain_forward(trainer, encoded)
        gc.collect()
        print(f"{args.what} {i}: RSS before {before:.0f} MB, peak {_status_bytes('VmHWM') / MB:.0f} MB, "
              f"after {rss():.0f} MB; noise cache {(_noise_cache_bytes() or 0) / MB:.0f} MB", flush=True)
    live = {}
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.numel() * obj.element_size() > 16 * MB:
                live[obj.untyped_storage().data_ptr()] = (tuple(obj.shape), obj.untyped_storage().nbytes() / MB)
    eng = trainer.engine
    print(f"live tensors > 16 MiB: {sorted(live.values())}")
    print(f"model parameters {sum(p.numel() * p.element_size() for p in eng.model.parameters()) / MB:.0f} MB, "
          f"KV pool {sum(t.numel() * t.element_size() for t in eng.pool.k_pools + eng.pool.v_pools) / MB:.0f} MB")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"RSS after malloc_trim(0): {rss():.0f} MB")


if __name__ == "__main__":
    main()
