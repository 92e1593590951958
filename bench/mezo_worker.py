"""One contestant of bench_mezo.py per process: it builds its side (the reference MeZO step, the
careful transformers loop, the engine step, the engine's plain forward, or the engine step without
prefix cache) and then runs one call whenever the parent asks, reporting the call's wall time and
peak memory.

Why processes: each contestant's peak memory is its own (a fresh process per scenario and
contestant, so peaks never mix), while the parent still interleaves the calls of all contestants
one at a time, so the load of a shared machine falls on all of them alike. Processes are forked
from a multiprocessing forkserver that has imported torch, transformers, peft and the project once
(importing costs ~20 s on a loaded 2-core machine; a fork costs nothing).

Peak memory of a call:
- CPU: peak resident set size. Linux resets the high-water mark VmHWM when "5" is written to
  /proc/self/clear_refs, so VmHWM after the call is the call's peak; where that is unavailable a
  2 ms psutil sampler stands in (it can miss short spikes; the result names the method). Before
  each call the glibc heap is trimmed (malloc_trim(0)): glibc keeps freed mid-size buffers in the
  heap, so without it a call's peak would also count what earlier calls freed but glibc kept; the
  amount trimmed is reported as `heap_retained_bytes` (it shows how the process's RSS would creep).
- GPU: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats.
`peak_bytes` is absolute (interpreter, weights, KV pool, temporaries); `before_bytes` the level
just before the call.

Run as a script, it is a diagnostic (CPU, Linux): where does a MeZO step's resident memory go? It
runs N engine steps (or N plain forwards of the same 2xB requests) of one scenario in this process
WITHOUT trimming the heap and prints, per call, RSS before, peak RSS, RSS after and the bytes held by
the torch path's noise memo (kernels.noise_cache); then the live tensors over 16 MiB and the RSS
after malloc_trim(0). Runs with and without a fixed glibc mmap threshold separate memory the engine
holds from memory glibc keeps after it was freed:

    python bench/mezo_worker.py lm_256 step 3
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/mezo_worker.py lm_256 step 3
    python bench/mezo_worker.py lm_256 forward 3
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import mezo_workloads as w  # noqa: E402
from bench.common import bench_seconds, timed  # noqa: E402

PRELOAD = ["torch", "transformers", "peft", "engine", "mezo", "bench.mezo_workloads", "bench.mezo_forkserver_warm"]
MB = 2**20
_ctx: Any = None


def context() -> Any:
    """The forkserver context (preloading PRELOAD); spawn where fork is unavailable."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if _ctx.get_start_method() == "forkserver":
            _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def start_server() -> None:
    """Start the forkserver now, so that it imports while the caller does other work."""
    if context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


# -- peak memory ------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":")), None)
    except OSError:
        return None


def _malloc_trim() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _noise_cache_bytes() -> int | None:
    """Bytes held by the torch path's noise memo (kernels.noise_cache), if the engine has one."""
    try:
        from kernels import noise_cache
    except ImportError:
        return None
    return int(getattr(noise_cache, "_cache_bytes", 0))


class PeakMeter:
    """`start()` returns the level before a call, `stop()` its peak (bytes; methods in the module doc)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.method, self.retained, self._max = "", 0, 0
        self._sampler: threading.Thread | None = None

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        rss = _status_bytes("VmRSS")
        if rss is None:
            import psutil

            rss = psutil.Process().memory_info().rss
        return rss

    def start(self) -> int:
        gc.collect()
        self.retained = 0
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated"
            return self.current()
        before = self.current()
        if _malloc_trim():
            after = self.current()
            self.retained, before = max(0, before - after), after
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := current RSS
            if _status_bytes("VmHWM") is not None:
                self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs before each call)"
                return before
        except OSError:
            pass
        self.method, self._max = "RSS sampled every 2 ms (psutil)", before

        def sample() -> None:
            while self._sampler is not None:
                self._max = max(self._max, self.current())
                time.sleep(0.002)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return before

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is not None:
            sampler, self._sampler = self._sampler, None  # the sampler loop ends when it sees None
            sampler.join()
            return max(self._max, self.current())
        return _status_bytes("VmHWM") or 0


# -- the contestant, inside the child --------------------------------------------------------------------
class Side:
    """One contestant, built from a spec: model (ModelRef fields), scenario, sizes (Sizes fields), role,
    threads, and optional examples (run on the first N examples only), lora_init (path to read the
    adapter from: the two transformers sides), save_lora_init (path to write the engine's initial
    adapter to), estimate_noise (time kernels.randn, for the full-mode skip)."""

    def __init__(self, spec: dict[str, Any]):
        ref = w.ModelRef(**spec["model"])
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device, self.role = ref.device, spec["role"]
        scenario = w.SCENARIOS[spec["scenario"]]
        tok = w.load_tokenizer(ref.tokenizer_path)
        examples = w.build_examples(scenario, w.Sizes(**spec["sizes"]), tok)
        k = spec.get("examples") or len(examples)
        hf = w.build_hf_model(ref)
        self.info: dict[str, Any] = {"model_params": sum(p.numel() for p in hf.parameters()),
                                     "layers": hf.config.num_hidden_layers, "hidden": hf.config.hidden_size,
                                     "examples": k}
        init = torch.load(spec["lora_init"]) if spec.get("lora_init") else None
        if self.role == "baseline":
            self.mezo, batch = w.build_baseline(hf, tok, ref, scenario, examples, init)
            self.batch = w.sub_batch(batch, k) if k < len(examples) else batch
            vocab = hf.get_output_embeddings().weight.shape[0]
            self.info.update(reference_rows=int(batch.input_ids.shape[0]), reference_width=int(batch.input_ids.shape[1]),
                             reference_logits_bytes=int(batch.input_ids.numel()) * vocab * 4,
                             workload_tokens_per_step=2 * sum(batch.lengths),
                             trainable_params=sum(p.numel() for _, p in self.mezo.params))
        elif self.role == "hf_loop":
            self.mezo, self.batch = w.build_hf_loop(hf, tok, ref, scenario, examples, init)
            self.info.update(rows=int(self.batch.input_ids.shape[0]), width=int(self.batch.input_ids.shape[1]),
                             attn_implementation=getattr(hf.config, "_attn_implementation", None))
        else:
            full_encoded = w.encode_examples(tok, examples)
            self.trainer, self.encoded = w.build_engine(
                hf, tok, ref, scenario, examples[:k], prefix_cache=self.role != "engine_no_prefix_cache",
                cache_tokens=w.kv_tokens_needed(full_encoded))
            eng = self.trainer.engine
            self.info.update(w.describe(scenario, full_encoded), attention_backend=eng.backend.name,
                             trainable_params=sum(t.numel() for t in self.trainer.params.values()),
                             kv_pool_tokens=eng.pool.num_usable_pages * eng.page_size)
            if spec.get("save_lora_init") and scenario.mode == "lora":
                torch.save({n: t.detach().cpu().clone() for n, t in self.trainer.params.items()}, spec["save_lora_init"])
            if spec.get("estimate_noise"):
                self.info["noise_estimate"] = noise_estimate(self.info["trainable_params"], ref.device)
        del hf
        gc.collect()
        self.meter = PeakMeter(ref.device)

    def run(self, i: int) -> int:
        """Call i (< 0: warm-up); returns the tokens it pushed through the model."""
        if self.role in ("baseline", "hf_loop"):
            self.mezo.step(self.batch, seed=1000 + i)
            return 2 * int(self.batch.input_ids.numel())
        if self.role != "engine_forward":
            return self.trainer.step(self.encoded)["tokens_computed"]
        t0 = self.trainer.engine.runner.tokens_computed
        w.plain_forward(self.trainer, self.encoded)
        return self.trainer.engine.runner.tokens_computed - t0

    def call(self, i: int) -> dict[str, Any]:
        before = self.meter.start()
        tokens, seconds = timed(lambda: self.run(i), self.device)
        peak = self.meter.stop()
        return {"seconds": seconds, "tokens_computed": tokens, "peak_bytes": peak, "before_bytes": before,
                "heap_retained_bytes": self.meter.retained, "noise_cache_bytes": _noise_cache_bytes(),
                "memory_method": self.meter.method}


def noise_estimate(elements: int, device: str) -> dict[str, Any]:
    """Rough time to generate z once for every trainable element with kernels.randn on this device
    (a full-parameter engine step generates it at least once, in its first forward pass)."""
    from kernels import randn

    n = 1 << 20
    randn(1, (n,), device=device)
    rate = n / bench_seconds(lambda: randn(2, (n,), device=device), device, repeats=1)
    return {"elements": elements, "elements_per_s": rate, "seconds_per_generation": elements / rate}


# -- the process and its parent-side handle ---------------------------------------------------------------
_side: Side | None = None  # in a contestant process: its side, kept between calls


def build_side(spec: dict[str, Any]) -> dict[str, Any]:
    global _side
    _side = Side(spec)
    return {**_side.info, "pid": os.getpid()}


def call_side(i: int) -> dict[str, Any]:
    return _side.call(i)


def prepare_weights(ref: dict[str, Any]) -> None:
    """Convert and cache the weights once, not once per contestant (the GGUF conversion is slow)."""
    w.build_hf_model(w.ModelRef(**ref))


class Worker:
    """Parent-side handle of one contestant process: a one-process pool forked from the forkserver.
    Errors raised in the child come back with its traceback."""

    def __init__(self, name: str):
        self.name, self.pid = name, None
        self.pool = ProcessPoolExecutor(max_workers=1, mp_context=context())

    def ask(self, fn: Callable[[Any], Any], arg: Any, timeout_s: float = 3600.0) -> Any:
        try:
            out = self.pool.submit(fn, arg).result(timeout=timeout_s)
        except BrokenProcessPool:
            raise RuntimeError(f"{self.name}: the process died during {fn.__name__} (out of memory?)") from None
        except TimeoutError:
            self.close(kill=True)
            raise TimeoutError(f"{self.name}: {fn.__name__} took more than {timeout_s:.0f} s") from None
        self.pid = out.get("pid", self.pid) if isinstance(out, dict) else self.pid
        return out

    def close(self, kill: bool = False) -> None:
        if kill and self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
        self.pool.shutdown(wait=True, cancel_futures=True)


# -- the memory diagnostic --------------------------------------------------------------------------------
def probe(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=list(w.SCENARIOS))
    ap.add_argument("what", choices=["step", "forward"])
    ap.add_argument("calls", type=int, nargs="?", default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    side = Side({"model": asdict(w.ModelRef(args.model, None, "float32", "cpu")), "scenario": args.scenario,
                 "sizes": asdict(w.Sizes()), "threads": args.threads,
                 "role": "engine" if args.what == "step" else "engine_forward"})
    rss = lambda: _status_bytes("VmRSS") / MB  # noqa: E731
    for i in range(args.calls):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = rss()
        side.run(i)
        gc.collect()
        print(f"{args.what} {i}: RSS before {before:.0f} MB, peak {_status_bytes('VmHWM') / MB:.0f} MB, "
              f"after {rss():.0f} MB; noise cache {(_noise_cache_bytes() or 0) / MB:.0f} MB", flush=True)
    live = {}
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.numel() * obj.element_size() > 16 * MB:
                live[obj.untyped_storage().data_ptr()] = (tuple(obj.shape), obj.untyped_storage().nbytes() / MB)
    eng = side.trainer.engine
    print(f"live tensors > 16 MiB: {sorted(live.values())}")
    print(f"model parameters {sum(p.numel() * p.element_size() for p in eng.model.parameters()) / MB:.0f} MB, "
          f"KV pool {sum(t.numel() * t.element_size() for t in eng.pool.k_pools + eng.pool.v_pools) / MB:.0f} MB")
    _malloc_trim()
    print(f"RSS after malloc_trim(0): {rss():.0f} MB")


if __name__ == "__main__":
    probe()
