"""Counter-based Gaussian noise: a pure-torch twin of Triton's ``tl.randn`` (DESIGN.md section 4).

``randn(seed, shape, offset)[i] == tl.randn(seed, offset + i)`` for every flat (row-major) index i, so the
CPU path, the fused GPU kernels and a replayed run all perturb by the same z. The generator is
Philox-4x32 with 10 rounds, keyed by the 64-bit seed (lo word, hi word), counter (offset lo, offset hi, 0, 0);
the first two output words go through ``uint_to_uniform_float`` and one Box-Muller branch.

uint32 arithmetic is emulated in int64 with every intermediate kept below 2^63 (signed overflow is
undefined behaviour in the C++ kernels behind torch, so we never rely on wrap-around). The transcendental
Box-Muller steps are evaluated in float64 and rounded to float32, i.e. as a correctly rounded float32
library would, so the result is the same on every machine. Triton's own float32 log/cos are not
correctly rounded (numpy in the interpreter: ~1 in 4 values differ by an ulp or two, max 5e-7 seen;
compiled GPU kernels may use approximate log/cos instructions), so "equal" means within ~1e-6
(a little more on a GPU where u1 is close to 1), not bit-exact.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Sequence

import torch
from ._triton import tl, triton  # a stand-in when Triton is not installed

from .launch_config import randn_config, target_of

__all__ = ["randn", "randn_segments", "randn_triton", "derive_seed", "derive_seed_v0", "mix63"]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85      # Philox-4x32 key bumps (Weyl sequence)
_N_ROUNDS = 10
_CHUNK = 1 << 16  # elements per pass: four int64 [2, chunk] scratch buffers (4 MiB) stay cache-resident
_FUSED_CHUNK = 1 << 16  # the compiled Philox's fixed chunk (one graph per key form; other sizes run eager)
_MIN_COMPILED_TAIL = _FUSED_CHUNK // 64  # a shorter partial chunk runs eager (~40 tiny ops beat a full chunk)
_FILL_SEGMENTS = 64  # randn_segments: chunks of at most this many segments fill keys per segment
_UNIFORM_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float scale for 32-bit words
_U1_MIN, _TWO_PI = 1.0e-7, 6.283185307179586  # tl.randn's clamp of u1 and 2*pi (one place: both paths)


def _numel(shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return shape, math.prod(shape)


def _philox_words01(seed: int, start: int, bufs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First two Philox-4x32-10 output words for counters start..start+n-1, as int64 in [0, 2^32).

    Returns (word0, word1, a free [2, n] scratch buffer). ``bufs`` are four int64 [2, n] scratch
    tensors (reused across chunks: fresh pages cost more than the arithmetic).
    """
    x, y, _, t = bufs
    torch.arange(start, start + x.shape[1], out=t[0])
    return _philox_rounds(seed & _M32, (seed >> 32) & _M32, t[0], bufs)


def _philox_rounds(k0: int | torch.Tensor, k1: int | torch.Tensor, ctr: torch.Tensor,
                   bufs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager Philox-4x32-10 words 0 and 1 for the int64 counters ``ctr`` [n] (may alias bufs[3][0]).

    The key words k0/k1 (lo/hi 32 bits of the seed) are ints, or int64 [n] tensors giving every
    element its own key (the batched pass over many tensors, `randn_segments`).

    The two multiplications of a round run on the two rows. For a < 2^32 we write
    a = 2^31 + a', so c*a = c*a' + (c & 1)*2^31 + (c >> 1)*2^32 with c*a' + 2^31 < 2^63:
    lo = (c*a' + (c&1)<<31) mod 2^32 and hi = ((c*a' + (c&1)<<31) >> 32) + (c >> 1), no overflow.
    Rows swap roles every round (state x holds [c0, c2] then [c2, c0]), which saves all copies.
    """
    x, y, s, t = bufs  # x rows: words fed to the multipliers; y rows: words xor-ed into the result
    torch.bitwise_and(ctr, _M32, out=x[0])       # c0 = offset lo
    x[1].zero_()                                 # c2 = 0
    torch.bitwise_right_shift(ctr, 32, out=y[0])  # c1 = offset hi (0 for int32 offsets)
    y[1].zero_()                                 # c3 = 0
    mul_a, mul_b = _ROUND_A - 2**31, _ROUND_B - 2**31  # a' for both multipliers
    for r in range(_N_ROUNDS):
        even = r % 2 == 0
        torch.mul(x[0], mul_a if even else mul_b, out=s[0])  # (a broadcast [2, 1] multiplier is slower)
        torch.mul(x[1], mul_b if even else mul_a, out=s[1])
        torch.bitwise_and(x, 1, out=t)
        t <<= 31
        s += t
        x >>= 1
        torch.bitwise_right_shift(s, 32, out=t)
        t += x                     # t = umulhi, s = mul lo after the mask below
        s &= _M32
        t[0] ^= y[1]
        t[1] ^= y[0]
        # even: t rows = [hi(A*c0), hi(B*c2)] -> [c2', c0'];  odd: [hi(B*c2), hi(A*c0)] -> [c0', c2']
        t[0] ^= k1 if even else k0
        t[1] ^= k0 if even else k1
        x, y, s, t = t, s, x, y
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32  # new tensors: the caller's keys stay intact
    # after an even number of rounds the rows are back in [c0, c2] / [c1, c3] order
    return x[0], y[0], s


def _uniform(w: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: bitcast to int32, fold negatives with ~x, scale in float32.

    For a word w in [0, 2^32) that is ``w ^ 0xFFFFFFFF`` when bit 31 is set, else w.
    """
    torch.bitwise_right_shift(w, 31, out=scratch)
    scratch.neg_()
    scratch &= _M32
    scratch ^= w
    return scratch.to(torch.float32) * _UNIFORM_SCALE  # scalar is rounded to float32, product in float32


def _philox_words01_fused(k0: torch.Tensor, k1: torch.Tensor, ctr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two words as `_philox_rounds` for int64 [] or [_FUSED_CHUNK] keys (k0, k1: lo/hi words of
    each element's seed) and counters, written as one expression for torch.compile, so inductor
    fuses the 10 rounds into one loop. Integer ops only: the result is exact, like eager. Keys of
    one seed ([]) serve one tensor's chunk; per-element keys the batched pass over many tensors."""
    c0, c1 = ctr & _M32, ctr >> 32
    c2 = c3 = torch.zeros_like(ctr)
    for _ in range(_N_ROUNDS):
        p0 = c0 * (_ROUND_A - 2**31) + ((c0 & 1) << 31)  # see _philox_rounds for the split multiply
        p1 = c2 * (_ROUND_B - 2**31) + ((c2 & 1) << 31)
        hi0, lo0 = (p0 >> 32) + (c0 >> 1), p0 & _M32
        hi1, lo1 = (p1 >> 32) + (c2 >> 1), p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1


def _uniform_expr(w: torch.Tensor) -> torch.Tensor:
    """`_uniform` as one expression (for torch.compile): the same integer ops, then the same float32
    conversion and float32 product, so the same bits."""
    return (w ^ ((-(w >> 31)) & _M32)).to(torch.float32) * _UNIFORM_SCALE


def _uniforms_fused(k0: torch.Tensor, k1: torch.Tensor, ctr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller's two float32 inputs (u1 clamped to >= 1e-7, and theta = 2*pi*u2) for _FUSED_CHUNK
    counters, written for torch.compile: Philox, the uint-to-float map and both products in one loop.

    ``k0``/``k1``: int64, [] (one seed) or [_FUSED_CHUNK] (per-element keys); ``ctr``: int64
    [_FUSED_CHUNK] counters, or [] = the first of _FUSED_CHUNK consecutive counters (generated in the
    loop, never stored). Integer ops plus IEEE float32 conversion and products: exactly eager's bits.
    The rest of Box-Muller stays eager (`_normal`): compiling it whole changed the last bit of ~0.6 %
    of values (the float32 roundings between its steps), and a compiled float64 log/cos alone matched
    eager but ran slower."""
    if ctr.dim() == 0:
        ctr = ctr + torch.arange(_FUSED_CHUNK, dtype=torch.int64, device=ctr.device)
    w0, w1 = _philox_words01_fused(k0, k1, ctr)
    return torch.clamp_min(_uniform_expr(w0), _U1_MIN), _uniform_expr(w1) * _TWO_PI


class _CompiledUniforms:
    """torch.compile'd `_uniforms_fused` for full CPU chunks: the eager integer ops are ~40 tiny
    passes over the chunk, the compiled loop one (full-parameter MeZO regenerates z for 10^8 weights a
    step; a LoRA step has ~10 chunks). Compiled on first use (once per process, ~20 s, then cached by
    inductor on disk); each input form (one seed / per-element keys) is checked once against the eager
    ops, and any failure falls back to eager for good. MEZO_COMPILE_NOISE=0 turns it off."""

    def __init__(self) -> None:
        self.fn = None
        self.enabled = os.environ.get("MEZO_COMPILE_NOISE", "1") != "0"
        self._checked: set[tuple[int, int]] = set()

    def __call__(self, seed: int, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(u1, theta) of one seed for counters start..start+_FUSED_CHUNK-1, or None (use eager)."""
        if not self.enabled:
            return None
        scalar = functools.partial(torch.tensor, dtype=torch.int64)
        return self.keyed(scalar(seed & _M32), scalar((seed >> 32) & _M32), scalar(start))

    def keyed(self, k0: torch.Tensor, k1: torch.Tensor, ctr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(u1, theta) for keys and counters as `_uniforms_fused` takes them (CPU), or None."""
        if not self.enabled:
            return None
        try:
            if self.fn is None:
                self.fn = torch.compile(_uniforms_fused, dynamic=False)
            out = self.fn(k0, k1, ctr)
            form = (k0.dim(), ctr.dim())
            if form not in self._checked:  # one eager chunk guards the noise contract against a miscompile
                full = ctr + torch.arange(_FUSED_CHUNK, dtype=torch.int64) if ctr.dim() == 0 else ctr
                bufs = [torch.empty(2, _FUSED_CHUNK, dtype=torch.int64) for _ in range(4)]
                keys = [k.expand(_FUSED_CHUNK).clone() for k in (k0, k1)]
                w0, w1, scratch = _philox_rounds(keys[0], keys[1], full, bufs)
                eager = _uniforms(w0, w1, scratch)
                if not all(torch.equal(a, b) for a, b in zip(out, eager)):
                    raise RuntimeError("compiled Philox disagrees with the eager one")
                self._checked.add(form)
            return out
        except Exception as err:  # no compiler, unsupported platform, ...: eager still gives the same bits
            warnings.warn(f"compiled Philox unavailable, using eager torch ops ({type(err).__name__}: {err})")
            self.enabled = False
            return None


_compiled_philox = _CompiledUniforms()


def _compiled_fits(m: int, start: int) -> bool:
    """Whether the m counters from `start` go through the compiled Philox: a full chunk, or a partial one
    of at least _MIN_COMPILED_TAIL computed as a full chunk and cut (the counters past it are thrown
    away, so they only need to fit int64). A full-parameter step's tensors mostly end in a partial
    chunk (576 x 1536 = 13.5 chunks): run eager, those tails cost more than all the full chunks."""
    return m == _FUSED_CHUNK or (m >= _MIN_COMPILED_TAIL and start + _FUSED_CHUNK <= 2**63 - 1)


def _randn_flat(seed: int, start: int, bufs: list[torch.Tensor], compiled: bool = False) -> torch.Tensor:
    """Normals for counters start..start+n-1 where n = bufs[0].shape[1] (compiled: n <= _FUSED_CHUNK)."""
    n = bufs[0].shape[1]
    uniforms = _compiled_philox(seed, start) if compiled else None
    if uniforms is None:
        uniforms = _uniforms(*_philox_words01(seed, start, bufs))
    return _normal(uniforms[0][:n], uniforms[1][:n])


def _uniforms(w0: torch.Tensor, w1: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tl.randn's Box-Muller inputs from Philox words 0/1 (int64 [n] in [0, 2^32); scratch: int64
    [2, n]): u1 (float32, clamped to >= 1e-7) and theta = 2*pi*u2 (float32)."""
    return torch.clamp_min(_uniform(w0, scratch[0]), _U1_MIN), _uniform(w1, scratch[1]) * _TWO_PI


def _normal(u1: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """tl.randn's normal sqrt(-2 log u1) cos(theta) from float32 u1, theta: float32 ops, each result
    correctly rounded: log and cos through float64, *(-2) (exact), sqrt (IEEE float32 sqrt is
    correctly rounded, as rounding the float64 one would be), one product."""
    lg = torch.log(u1.double()).float()
    r = torch.sqrt(lg * -2.0)
    c = torch.cos(th.double()).float()
    return r * c


def randn(seed: int, shape: int | Sequence[int], offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 tensor with ``out.view(-1)[i] == tl.randn(seed, offset + i)`` (row-major flat index).

    ``seed`` may be any int (its low 64 bits key Philox, like Triton); ``offset + numel`` may exceed
    2^31 here, but the Triton kernels use int32 offsets, so tensors that are perturbed on the GPU must
    stay below 2^31 elements.
    """
    shape, n = _numel(shape)
    if offset < 0:
        raise ValueError("offset must be non-negative")
    if offset + n > 2**63 - 1:  # int64 counters (the compiled path would wrap instead of failing)
        raise ValueError(f"offset + numel = {offset + n} does not fit int64 counters")
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = int(seed) & _M64
    out = torch.empty(n, dtype=torch.float32, device=device)
    full = [torch.empty(2, min(n, _CHUNK), dtype=torch.int64, device=device) for _ in range(4)]
    compiled = device.type == "cpu" and _CHUNK == _FUSED_CHUNK
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        bufs = full if m == full[0].shape[1] else [b[:, :m] for b in full]
        out[start:start + m] = _randn_flat(seed, offset + start, bufs, compiled and _compiled_fits(m, offset + start))
    return out.view(shape)


def randn_segments(seeds: Sequence[int], numels: Sequence[int],
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The noise of many tensors in one batched pass: a flat float32 tensor [sum(numels)] whose j-th
    segment is exactly ``randn(seeds[j], numels[j])`` (offset 0: counter = the element's index in
    its own tensor), bit for bit.

    Why: a LoRA step has ~100 small tensors; generating them one by one costs ~40 tiny torch ops
    each (~1 ms per tensor on one CPU thread), all overhead. Here every element carries its
    tensor's key, and the concatenation runs in chunks of _CHUNK elements (the compiled Philox on
    full CPU chunks, eager ops for the rest), so the cost is that of one tensor of the total size.
    Raises ValueError when the lengths differ or a numel is negative.
    """
    if len(seeds) != len(numels):
        raise ValueError(f"randn_segments: {len(seeds)} seeds but {len(numels)} numels")
    sizes = [int(n) for n in numels]
    for j, n in enumerate(sizes):
        if n < 0:
            raise ValueError(f"randn_segments: numels must be >= 0, got numels[{j}] = {n}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    total = sum(sizes)
    out = torch.empty(total, dtype=torch.float32, device=device)
    if total == 0:
        return out
    keys = [int(s) & _M64 for s in seeds]
    starts = [0] * len(sizes)
    for j in range(1, len(sizes)):
        starts[j] = starts[j - 1] + sizes[j - 1]
    tables: list[torch.Tensor] = []  # lo, hi, first per segment: only for chunks of many segments
    full = [torch.empty(2, min(total, _CHUNK), dtype=torch.int64, device=device) for _ in range(4)]
    per_element = torch.empty(3, min(total, _CHUNK), dtype=torch.int64, device=device)
    compiled = device.type == "cpu" and _CHUNK == _FUSED_CHUNK
    j = 0  # the first segment that reaches into the current chunk
    for a in range(0, total, _CHUNK):
        b = min(a + _CHUNK, total)
        m = b - a
        while starts[j] + sizes[j] <= a:
            j += 1
        last = j
        while last + 1 < len(sizes) and starts[last + 1] < b:
            last += 1
        # every element's key words and its counter (index inside its own tensor)
        k0, k1, ctr = per_element[:, :m]
        torch.arange(a, b, out=ctr)
        if last - j < _FILL_SEGMENTS:  # a few segments: three slice ops each
            for i in range(j, last + 1):
                lo_i, hi_i = max(starts[i], a) - a, min(starts[i] + sizes[i], b) - a
                k0[lo_i:hi_i] = keys[i] & _M32
                k1[lo_i:hi_i] = keys[i] >> 32
                ctr[lo_i:hi_i] -= starts[i]
        else:  # many tiny segments: three repeat_interleave passes, whatever their number
            if not tables:
                tables = [torch.tensor(v, dtype=torch.int64, device=device)
                          for v in ([k & _M32 for k in keys], [k >> 32 for k in keys], starts)]
            counts = torch.tensor([min(starts[i] + sizes[i], b) - max(starts[i], a) for i in range(j, last + 1)],
                                  dtype=torch.int64, device=device)
            for dst, table, sub in ((k0, tables[0], False), (k1, tables[1], False), (ctr, tables[2], True)):
                spread = torch.repeat_interleave(table[j:last + 1], counts, output_size=m)
                dst.sub_(spread) if sub else dst.copy_(spread)
        # a partial last chunk runs as a full one when the buffer is full-size (its tail holds the
        # previous chunk's keys and counters: valid inputs, whose outputs are cut off)
        uniforms = None
        if compiled and per_element.shape[1] == _FUSED_CHUNK and _compiled_fits(m, 0):
            uniforms = _compiled_philox.keyed(*per_element)
        if uniforms is None:
            bufs = full if m == full[0].shape[1] else [x[:, :m] for x in full]
            uniforms = _uniforms(*_philox_rounds(k0, k1, ctr, bufs))
        out[a:b] = _normal(uniforms[0][:m], uniforms[1][:m])
    return out


@triton.jit(do_not_specialize=["seed"])
def _randn_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    tl.store(out_ptr + idx, tl.randn(seed, offset + idx), mask=mask)


def randn_triton(seed: int, shape: int | Sequence[int], offset: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Ground truth: the same noise straight from ``tl.randn`` (the interpreter when there is no GPU)."""
    shape, n = _numel(shape)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        cfg = randn_config(n, target_of(out.device))
        _randn_kernel[cfg.grid(n)](out, seed, offset, n, BLOCK=cfg.block, num_warps=cfg.num_warps)
    return out.view(shape)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


# ---- tensor seeds (noise version 1) -----------------------------------------------------------
TENSOR_INDEX_BITS = 21  # tensor indices < 2^21 (a 405B LLaMA with LoRA on every projection has < 2^11)
_M63 = (1 << 63) - 1
_MIX_A, _MIX_B = 0x5851F42D4C957F2D & _M63, 0x14057B7EF767814F  # odd: invertible multipliers mod 2^63


def mix63(x: int) -> int:
    """A fixed bijection of [0, 2^63) (xorshift-multiply rounds; each step is invertible on 63-bit
    words: x ^ (x >> s) for s >= 1, and multiplication by an odd constant mod 2^63)."""
    x ^= x >> 31
    x = (x * _MIX_A) & _M63
    x ^= x >> 29
    x = (x * _MIX_B) & _M63
    return x ^ (x >> 32)


def derive_seed(sample_seed: int, tensor_index: int) -> int:
    """The one map (sample seed, tensor index) -> Philox seed of that tensor's noise, in [0, 2^63).

    ``sample_seed`` (an int in [0, 2^63)) names one perturbation: one SPSA sample k of one step of
    one run (``mezo.seeds.step_seed`` makes it); ``tensor_index`` (an int in [0, 2^21)) is the
    tensor's place in the trainable-tensor order. The result is ``mix63(sample_seed ^ index << 42)``.

    Why no two noise streams of a run collide: a run's sample seeds are ``c(run) ^ (k << 32 | step)``
    with step < 2^32 and k < 2^10, so the word mixed here is ``c(run) ^ (index << 42 | k << 32 | step)``:
    the three fields fill disjoint bits of a 63-bit word, so distinct (step, k, index) give distinct
    words; xor with the run's constant and ``mix63`` are bijections, so they give distinct Philox keys,
    and Philox-4x32 is keyed by the whole 64-bit seed. (The same holds among any sample seeds that
    agree in their top 21 bits, e.g. every seed < 2^42.) The old 31-bit seeds collided after ~50k steps.

    Seeds stay below 2^63 so Triton passes them as int64 (never uint64); ``tl.randn`` keys Philox
    with their (lo, hi) 32-bit words, exactly as `randn` does, and an int64 seed tensor read in a
    kernel gives the same key. Raises ValueError for values outside those ranges.
    """
    if isinstance(sample_seed, bool) or not isinstance(sample_seed, int) or not 0 <= sample_seed <= _M63:
        raise ValueError(f"derive_seed: sample_seed={sample_seed!r} must be an int in [0, 2**63)")
    if isinstance(tensor_index, bool) or not isinstance(tensor_index, int) or not 0 <= tensor_index < 1 << TENSOR_INDEX_BITS:
        raise ValueError(f"derive_seed: tensor_index={tensor_index!r} must be an int in [0, 2**{TENSOR_INDEX_BITS})")
    return mix63(sample_seed ^ (tensor_index << (63 - TENSOR_INDEX_BITS)))


def derive_seed_v0(step_seed: int, tensor_index: int) -> int:
    """The 31-bit derivation of noise version 0 (before issue 12), kept only so that trajectories
    recorded with it replay exactly. Its seeds collide (~3 among 10^5 steps): never use it for a new run."""
    return _splitmix64((_splitmix64(int(step_seed) & _M64) ^ (int(tensor_index) & _M64)) & _M64) % 0x7FFFFFFF
