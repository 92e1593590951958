"""One contestant of bench_mezo.py per process: it builds its side (the reference MeZO step, the engine
step, the engine's plain forward, or the engine step without prefix cache) and then runs one call
whenever the parent asks, reporting the call's wall time and peak memory.

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
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import threading
import time
import traceback
from typing import Any

import torch

PRELOAD = ["torch", "transformers", "peft", "engine", "mezo", "bench.mezo_workloads", "bench.mezo_forkserver_warm"]
_ctx: Any = None


def context() -> Any:
    """The forkserver context (preloading PRELOAD); spawn where fork is unavailable."""
    global _ctx
    if _ctx is None:
        if "forkserver" in mp.get_all_start_methods():
            _ctx = mp.get_context("forkserver")
            _ctx.set_forkserver_preload(PRELOAD)
        else:
            _ctx = mp.get_context("spawn")
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
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
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
    retained = 0

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.method = ""
        self._sampler: threading.Thread | None = None
        self._running = False
        self._max = 0

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
        self.method = "RSS sampled every 2 ms (psutil)"
        self._max, self._running = before, True

        def sample() -> None:
            while self._running:
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
            self._running = False
            self._sampler.join()
            self._sampler = None
            return max(self._max, self.current())
        return _status_bytes("VmHWM") or 0


# -- the contestant, inside the child --------------------------------------------------------------------
class Side:
    """Built from a spec: model (ModelRef fields), scenario, sizes (Sizes fields), role, and optional
    examples (run on the first N examples only), lora_init (path to read the adapter from: baseline),
    save_lora_init (path to write the engine's initial adapter to)."""

    def __init__(self, spec: dict[str, Any]):
        from bench import mezo_workloads as w

        ref = w.ModelRef(**spec["model"])
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        self.device = ref.device
        self.role = role = spec["role"]
        scenario = w.SCENARIOS[spec["scenario"]]
        tok = w.load_tokenizer(ref.tokenizer_path)
        examples = w.build_examples(scenario, w.Sizes(**spec["sizes"]), tok)
        full_encoded = w.encode_examples(tok, examples)
        k = spec.get("examples") or len(examples)
        hf = w.build_hf_model(ref)
        self.info: dict[str, Any] = {"model_params": sum(p.numel() for p in hf.parameters()),
                                     "layers": hf.config.num_hidden_layers, "hidden": hf.config.hidden_size,
                                     "examples": k}
        if role == "baseline":
            init = torch.load(spec["lora_init"]) if spec.get("lora_init") else None
            self.mezo, batch = w.build_baseline(hf, tok, ref, scenario, examples, init)
            self.batch = w.sub_batch(batch, k) if k < len(examples) else batch
            vocab = hf.get_output_embeddings().weight.shape[0]
            self.info.update(reference_rows=int(batch.input_ids.shape[0]), reference_width=int(batch.input_ids.shape[1]),
                             reference_logits_bytes=int(batch.input_ids.numel()) * vocab * 4,
                             workload_tokens_per_step=2 * sum(batch.lengths),
                             trainable_params=sum(p.numel() for _, p in self.mezo.params))
            self.tokens = 2 * int(self.batch.input_ids.numel())
        elif role == "hf_loop":
            init = torch.load(spec["lora_init"]) if spec.get("lora_init") else None
            self.loop, self.batch = w.build_hf_loop(hf, tok, ref, scenario, examples, init)
            self.info.update(rows=int(self.batch.input_ids.shape[0]), width=int(self.batch.input_ids.shape[1]),
                             attn_implementation=getattr(hf.config, "_attn_implementation", None))
            self.tokens = 2 * int(self.batch.input_ids.numel())
        else:
            self.trainer, self.encoded = w.build_engine(
                hf, tok, ref, scenario, examples[:k], prefix_cache=role != "engine_no_prefix_cache",
                cache_tokens=w.kv_tokens_needed(full_encoded))
            eng = self.trainer.engine
            self.info.update(w.describe(scenario, full_encoded))
            self.info.update(trainable_params=w.trainable_numel(self.trainer),
                             kv_pool_tokens=eng.pool.num_usable_pages * eng.page_size,
                             attention_backend=eng.backend.name)
            if spec.get("save_lora_init") and scenario.mode == "lora":
                torch.save({n: t.detach().cpu().clone() for n, t in self.trainer.params.items()}, spec["save_lora_init"])
            if spec.get("estimate_noise"):
                self.info["noise_estimate"] = noise_estimate(self.info["trainable_params"], ref.device)
        del hf
        gc.collect()
        self.meter = PeakMeter(ref.device)

    def _run(self, i: int) -> int:
        if self.role == "baseline":
            self.mezo.step(self.batch, seed=1000 + i)
            return self.tokens
        if self.role == "hf_loop":
            self.loop.step(self.batch, seed=1000 + i)
            return self.tokens
        if self.role == "engine_forward":
            from bench.mezo_workloads import plain_forward

            t0 = self.trainer.engine.runner.tokens_computed
            plain_forward(self.trainer, self.encoded)
            return self.trainer.engine.runner.tokens_computed - t0
        return self.trainer.step(self.encoded)["tokens_computed"]

    def call(self, i: int) -> dict[str, Any]:
        from bench.common import bench_seconds

        before = self.meter.start()
        box: dict[str, int] = {}
        seconds = bench_seconds(lambda: box.__setitem__("tokens", self._run(i)), self.device, repeats=1)
        tokens = box["tokens"]
        peak = self.meter.stop()
        return {"seconds": seconds, "tokens_computed": tokens, "peak_bytes": peak, "before_bytes": before,
                "heap_retained_bytes": self.meter.retained, "noise_cache_bytes": _noise_cache_bytes(),
                "memory_method": self.meter.method}


def noise_estimate(elements: int, device: str) -> dict[str, Any]:
    """Rough time to generate z once for every trainable element with kernels.randn on this device
    (a full-parameter engine step generates it at least once, in its first forward pass)."""
    from bench.common import bench_seconds
    from kernels import randn

    n = 1 << 20
    randn(1, (n,), device=device)
    rate = n / bench_seconds(lambda: randn(2, (n,), device=device), device, repeats=1)
    return {"elements": elements, "elements_per_s": rate, "seconds_per_generation": elements / rate}


def _serve(conn: Any) -> None:
    side: Side | None = None
    while True:
        try:
            cmd, arg = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "build":
                side = Side(arg)
                conn.send({"info": side.info})
            elif cmd == "call":
                conn.send(side.call(arg))
            elif cmd == "prepare":  # make sure the weights are cached (one GGUF conversion, not one per worker)
                from bench.mezo_workloads import ModelRef, build_hf_model

                build_hf_model(ModelRef(**arg))
                conn.send({"ok": True})
            elif cmd == "quit":
                conn.send({"ok": True})
                return
            else:
                conn.send({"error": f"unknown command {cmd!r}"})
        except BaseException as err:  # report to the parent, never hang it
            conn.send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=12)})


class Worker:
    """Parent-side handle of one contestant process."""

    def __init__(self, name: str):
        ctx = context()
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True, name=f"mezo-bench-{name}")
        self.proc.start()
        child.close()

    def ask(self, cmd: str, arg: Any = None, timeout_s: float = 3600.0) -> dict[str, Any]:
        self.conn.send((cmd, arg))
        if not self.conn.poll(timeout_s):
            self.close()
            raise TimeoutError(f"{self.name}: {cmd} took more than {timeout_s:.0f} s")
        try:
            out = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"{self.name}: the process died during {cmd!r} (exit code {self.proc.exitcode}; "
                               f"out of memory?)") from None
        if "error" in out:
            raise RuntimeError(f"{self.name}: {cmd} failed: {out['error']}\n{out.get('traceback', '')}")
        return out

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("quit", None))
                self.proc.join(timeout=30)
            except (OSError, BrokenPipeError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
