"""Non-Triton paged attention: the torch reference (also the engine's CPU path) and the optional
flash-attn backend.

The reference gathers every sequence's KV from the page pool into a padded [B, Hkv, max_kv, D]
tensor and runs ONE batched `scaled_dot_product_attention` with an explicit boolean mask. A Python
loop per sequence or per token would be simpler but far too slow to serve as the CPU path.

GQA: instead of repeating each kv head H/Hkv times (which multiplies the gathered KV copy by the
group size), the query heads that share a kv head are folded into the query-length axis:
q [B, Lq, H, D] -> [B, Hkv, G*Lq, D] against k [B, Hkv, Lkv, D]. The result is identical to
repeating kv heads (head h reads kv head h // G) while the KV is gathered once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._device import host_to_device


def _kv_rows(page_table: Tensor, kv_lens: Tensor, max_kv: int, page_size: int, num_kv_heads: int) -> Tensor:
    """Flat (token, head) row of the pool for kv position j of head h of sequence b: [B*Hkv*max_kv].

    Positions past a sequence's end are redirected to its first token: the slots there may hold
    stale or uninitialised memory (even NaN), and a masked NaN still poisons softmax @ V (0 * NaN).
    """
    pos = torch.arange(max_kv, device=page_table.device)
    page_col = (pos // page_size).clamp_max(page_table.shape[1] - 1)
    flat = page_table[:, page_col].long() * page_size + pos % page_size          # [B, max_kv]
    flat = torch.where(pos[None, :] < kv_lens[:, None], flat, flat[:, :1])
    heads = torch.arange(num_kv_heads, device=page_table.device)
    return (flat[:, None, :] * num_kv_heads + heads[None, :, None]).flatten()   # [B, Hkv, max_kv]


def _gather_rows(pool: Tensor, rows: Tensor, bsz: int, max_kv: int) -> Tensor:
    """One `index_select` over (token, head) rows of the pool writes SDPA's head-major layout
    directly: a single copy, cheaper than advanced indexing followed by a permute + contiguous."""
    num_kv_heads, head_dim = pool.shape[2:]
    return pool.reshape(-1, head_dim).index_select(0, rows).view(bsz, num_kv_heads, max_kv, head_dim)


def gather_kv(pool: Tensor, page_table: Tensor, kv_lens: Tensor, max_kv: int) -> Tensor:
    """Gather kv positions 0..max_kv-1 of every sequence into a contiguous [B, Hkv, max_kv, D]
    (positions past a sequence's end hold a copy of its first token)."""
    page_size, num_kv_heads = pool.shape[1:3]
    return _gather_rows(pool, _kv_rows(page_table, kv_lens, max_kv, page_size, num_kv_heads),
                        page_table.shape[0], max_kv)


@dataclass(frozen=True)
class SdpaPlan:
    """The index tensors of one paged SDPA call that depend only on the batch's metadata, not on the
    layer: built once per forward pass and reused by every layer (the torch path's per-layer cost
    was mostly these small ops). ``kv_rows``: pool rows to gather [B*Hkv*max_kv]; ``mask``: bool
    [B, 1, G*Lq, max_kv] (G = query heads per kv head)."""

    kv_rows: Tensor
    mask: Tensor
    bsz: int
    lq: int
    max_kv: int
    group: int


def sdpa_plan(q_pos: Tensor, kv_lens: Tensor, max_kv: int, page_table: Tensor, page_size: int,
              num_heads: int, num_kv_heads: int) -> SdpaPlan:
    """Plan of `_paged_sdpa` for queries at q_pos [B, Lq] (see there for the mask's meaning)."""
    bsz, lq = q_pos.shape
    group = num_heads // num_kv_heads
    kv_pos = torch.arange(max_kv, device=q_pos.device)
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < kv_lens[:, None, None])
    # Keep every row non-empty so padding rows never produce NaN (some SDPA backends do).
    mask[:, :, 0] = True
    mask = mask[:, None, None].expand(bsz, 1, group, lq, max_kv).reshape(bsz, 1, group * lq, max_kv)
    rows = _kv_rows(page_table, kv_lens, max_kv, page_size, num_kv_heads)
    return SdpaPlan(rows, mask, bsz, lq, max_kv, group)


def _paged_sdpa(q_pad: Tensor, q_pos: Tensor | None, kv_lens: Tensor | None, max_kv: int, k_pool: Tensor,
                v_pool: Tensor, page_table: Tensor, sm_scale: float, plan: SdpaPlan | None = None) -> Tensor:
    """Causal attention of padded queries q_pad [B, Lq, H, D] at positions q_pos [B, Lq].

    Query (b, i) sees kv positions j with j <= q_pos[b, i] and j < kv_lens[b]. Returns
    [B, Lq, H, D]; rows of padding queries hold unspecified values. ``plan``: `sdpa_plan` of the
    same arguments, when the caller has it already (then q_pos and kv_lens are not read).
    """
    bsz, lq, num_heads, head_dim = q_pad.shape
    num_kv_heads = k_pool.shape[2]
    if plan is None:
        plan = sdpa_plan(q_pos, kv_lens, max_kv, page_table, k_pool.shape[1], num_heads, num_kv_heads)
    group = plan.group
    k = _gather_rows(k_pool, plan.kv_rows, bsz, max_kv).to(q_pad.dtype)
    v = _gather_rows(v_pool, plan.kv_rows, bsz, max_kv).to(q_pad.dtype)
    # [B, Lq, Hkv, G, D] -> [B, Hkv, G, Lq, D] -> [B, Hkv, G*Lq, D]
    q = q_pad.view(bsz, lq, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(bsz, num_kv_heads, group * lq, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, scale=sm_scale)
    out = out.view(bsz, num_kv_heads, group, lq, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(bsz, lq, num_heads, head_dim)


def _check_heads(q: Tensor, k_pool: Tensor) -> None:
    if q.shape[-2] % k_pool.shape[2] != 0:
        raise ValueError(f"num_heads {q.shape[-2]} is not a multiple of num_kv_heads {k_pool.shape[2]}")


def _token_rows(qo_indptr: Tensor, num_tokens: int, pad: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sequence, padded row) of every flattened token: token t of sequence b sits at row
    t - qo_indptr[b] (+ pad[b]) of b's padded queries. A gather, not a boolean mask: no host sync."""
    t = torch.arange(num_tokens, device=qo_indptr.device)
    seq = torch.searchsorted(qo_indptr[1:].long(), t, right=True)
    row = t - qo_indptr.long()[seq]
    return seq, row if pad is None else row + pad[seq]


@dataclass(frozen=True)
class ExtendPlan:
    """Everything `extend_attention_torch` derives from the batch's metadata alone (no q, no KV):
    the padded-query gather ``rows`` [B, max_ext], the SDPA plan, and each flattened token's
    (sequence, padded row). Valid for every layer of one forward pass (same metadata, heads, pages)."""

    rows: Tensor
    q_pos: Tensor
    kv_lens: Tensor
    sdpa: SdpaPlan
    seq: Tensor
    row: Tensor
    num_tokens: int


def extend_plan_torch(num_tokens: int, page_table: Tensor, qo_indptr: Tensor, prefix_lens: Tensor,
                      page_size: int, num_heads: int, num_kv_heads: int, max_extend_len: int | None = None,
                      max_seq_len: int | None = None) -> ExtendPlan:
    """The `ExtendPlan` of a batch (see `extend_attention_torch` for the arguments)."""
    starts = qo_indptr[:-1].long()
    ext_lens = qo_indptr[1:].long() - starts
    prefix = prefix_lens.long()
    kv_lens = prefix + ext_lens
    max_ext = int(ext_lens.max()) if max_extend_len is None else max_extend_len
    max_kv = int(kv_lens.max()) if max_seq_len is None else max_seq_len
    i = torch.arange(max_ext, device=qo_indptr.device)
    rows = (starts[:, None] + i[None, :]).clamp(0, num_tokens - 1)    # padded query gather
    q_pos = prefix[:, None] + i[None, :]
    sdpa = sdpa_plan(q_pos, kv_lens, max_kv, page_table, page_size, num_heads, num_kv_heads)
    seq, row = _token_rows(qo_indptr, num_tokens)
    return ExtendPlan(rows, q_pos, kv_lens, sdpa, seq, row, num_tokens)


PADDING_WASTE = 2.0  # group_by_padding: padding a sequence may cost this many times its own attention
SPLIT_MIN_AREA = 1 << 16  # ... or this many (query, key) pairs: below it another SDPA call costs more


def group_by_padding(ext_lens: Sequence[int], kv_lens: Sequence[int], waste: float = PADDING_WASTE,
                     min_area: int = SPLIT_MIN_AREA) -> list[list[int]]:
    """Sequences of one extend pass cut into groups for the padded SDPA of the torch path.

    One SDPA call pads every sequence to the longest extend (queries) and the longest prefix + extend
    (keys): a pass mixing 795-token prompts with 36-token suffixes computes ~20x its real attention.
    Sequences are taken largest (ext * kv) first; one joins the current group when the padded area
    it adds, (count * max ext * max kv) after minus before, is at most ``waste`` times its own
    ext * kv or at most ``min_area``; else it starts a new group. Returns lists of sequence indices
    (a single list: no split needed)."""
    order = sorted(range(len(ext_lens)), key=lambda b: -ext_lens[b] * kv_lens[b])
    groups: list[list[int]] = []
    max_ext = max_kv = 0
    for b in order:
        e, k = ext_lens[b], kv_lens[b]
        if groups:
            n, me, mk = len(groups[-1]), max(max_ext, e), max(max_kv, k)
            added = (n + 1) * me * mk - n * max_ext * max_kv
            if added <= max(waste * e * k, min_area):
                groups[-1].append(b)
                max_ext, max_kv = me, mk
                continue
        groups.append([b])
        max_ext, max_kv = e, k
    return groups


@dataclass(frozen=True)
class ExtendGroup:
    """One group of `group_by_padding`: the rows of q it owns (``tokens``, int64 [T_g]), its
    sequences' metadata as a batch of their own, and that batch's `ExtendPlan`."""

    tokens: Tensor
    page_table: Tensor
    qo_indptr: Tensor
    prefix_lens: Tensor
    plan: ExtendPlan


def extend_groups_torch(page_table: Tensor, qo_indptr: Tensor, prefix_lens: Tensor, ext_lens: Sequence[int],
                        seq_lens: Sequence[int], page_size: int, num_heads: int, num_kv_heads: int,
                        waste: float = PADDING_WASTE,
                        min_area: int = SPLIT_MIN_AREA) -> list[ExtendGroup] | None:
    """The groups of a pass whose padding `group_by_padding` splits, or None when one SDPA call is
    within ``waste`` (then `extend_plan_torch` serves). ``ext_lens``/``seq_lens``: the host lengths
    of every sequence (no device read)."""
    live = [b for b, e in enumerate(ext_lens) if e > 0]  # sequences without new tokens own no rows
    groups = [[live[i] for i in g] for g in group_by_padding([ext_lens[b] for b in live],
                                                             [seq_lens[b] for b in live], waste, min_area)]
    if len(groups) < 2:
        return None
    device = qo_indptr.device
    starts = [0]
    for e in ext_lens:
        starts.append(starts[-1] + e)
    out = []
    for members in groups:
        members.sort()  # the group's own batch keeps the pass's sequence order
        indptr = [0]
        for b in members:
            indptr.append(indptr[-1] + ext_lens[b])
        # host lists, queued to the device without a sync (as the launch tables are)
        idx = host_to_device(torch.tensor(members, dtype=torch.int64), device)
        tokens = host_to_device(torch.tensor([t for b in members for t in range(starts[b], starts[b + 1])],
                                             dtype=torch.int64), device)
        sub_indptr = host_to_device(torch.tensor(indptr, dtype=qo_indptr.dtype), device)
        sub_table, sub_prefix = page_table[idx], prefix_lens[idx]
        plan = extend_plan_torch(int(tokens.shape[0]), sub_table, sub_indptr, sub_prefix, page_size, num_heads,
                                 num_kv_heads, max(ext_lens[b] for b in members), max(seq_lens[b] for b in members))
        out.append(ExtendGroup(tokens, sub_table, sub_indptr, sub_prefix, plan))
    return out


def extend_attention_torch(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                           qo_indptr: Tensor, prefix_lens: Tensor, sm_scale: float,
                           max_extend_len: int | None = None, max_seq_len: int | None = None,
                           plan: ExtendPlan | list[ExtendGroup] | None = None) -> Tensor:
    """Reference extend attention: new tokens attend causally to cached prefix + themselves.
    `max_extend_len` / `max_seq_len`: host-side bounds (see kernels.attention.extend_attention);
    without them they are read from the device tensors (a host sync). `plan`: the batch's
    `extend_plan_torch`, or its `extend_groups_torch` (one padded SDPA per group; the engine builds
    either once per forward pass and hands it to every layer); built here when None. Raises
    ValueError when a given plan does not fit q."""
    _check_heads(q, k_pool)
    num_tokens = q.shape[0]
    if num_tokens == 0 or page_table.shape[0] == 0:
        return torch.empty_like(q)
    if isinstance(plan, list):
        if sum(int(g.tokens.shape[0]) for g in plan) != num_tokens:
            raise ValueError(f"extend groups for {sum(int(g.tokens.shape[0]) for g in plan)} tokens used with "
                             f"q {tuple(q.shape)}")
        out = torch.empty_like(q)
        for g in plan:
            out[g.tokens] = extend_attention_torch(q[g.tokens], k_pool, v_pool, g.page_table, g.qo_indptr,
                                                   g.prefix_lens, sm_scale, plan=g.plan)
        return out
    if plan is None:
        plan = extend_plan_torch(num_tokens, page_table, qo_indptr, prefix_lens, k_pool.shape[1], q.shape[1],
                                 k_pool.shape[2], max_extend_len, max_seq_len)
    elif plan.num_tokens != num_tokens or plan.sdpa.group != q.shape[1] // k_pool.shape[2]:
        raise ValueError(f"extend plan for {plan.num_tokens} tokens / group {plan.sdpa.group} used with q {tuple(q.shape)}")
    o = _paged_sdpa(q[plan.rows], plan.q_pos, plan.kv_lens, plan.sdpa.max_kv, k_pool, v_pool, page_table,
                    sm_scale, plan.sdpa)
    return o[plan.seq, plan.row]


def decode_plan_torch(page_table: Tensor, seq_lens: Tensor, page_size: int, num_heads: int, num_kv_heads: int,
                      max_seq_len: int | None = None) -> SdpaPlan:
    """The `SdpaPlan` of a decode batch (one query per sequence at seq_lens[b]-1): every layer's
    gather rows and mask, built once per forward pass (see `decode_attention_torch`)."""
    kv_lens = seq_lens.long()
    max_kv = int(kv_lens.max()) if max_seq_len is None else max_seq_len
    return sdpa_plan((kv_lens - 1)[:, None], kv_lens, max_kv, page_table, page_size, num_heads, num_kv_heads)


def decode_attention_torch(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                           seq_lens: Tensor, sm_scale: float, max_seq_len: int | None = None,
                           plan: SdpaPlan | None = None) -> Tensor:
    """Reference decode attention: query b sits at position seq_lens[b]-1 and sees all its kv.
    `plan`: the batch's `decode_plan_torch` (built here when None). Raises ValueError when a given
    plan does not fit q."""
    _check_heads(q, k_pool)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if plan is None:
        plan = decode_plan_torch(page_table, seq_lens, k_pool.shape[1], q.shape[1], k_pool.shape[2], max_seq_len)
    elif plan.bsz != q.shape[0] or plan.lq != 1 or plan.group != q.shape[1] // k_pool.shape[2]:
        raise ValueError(f"decode plan for {plan.bsz} x {plan.lq} queries / group {plan.group} used with "
                         f"q {tuple(q.shape)}")
    # positions and lengths are only read to build a plan, which exists by now
    o = _paged_sdpa(q[:, None], None, None, plan.max_kv, k_pool, v_pool, page_table, sm_scale, plan)
    return o[:, 0]


def flash_attn_available() -> bool:
    """True when flash-attn imports and a GPU is present (its paged path also needs page_size % 256 == 0)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import time
        return False
    return True


def _flash_check(k_pool: Tensor) -> None:
    if not flash_attn_available():
        raise RuntimeError("impl='flash_attn' needs flash-attn and a CUDA device")
    if k_pool.shape[1] % 256:
        raise ValueError(f"flash-attn paged KV needs page_size % 256 == 0, got {k_pool.shape[1]}")


def decode_attention_flash(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                           seq_lens: Tensor, sm_scale: float) -> Tensor:
    """Decode through flash-attn's paged `flash_attn_with_kvcache` (block_table = our page table)."""
    _flash_check(k_pool)
    from flash_attn import flash_attn_with_kvcache
    out = flash_attn_with_kvcache(q[:, None], k_pool, v_pool, cache_seqlens=seq_lens.int(),
                                  block_table=page_table.int(), softmax_scale=sm_scale, causal=True)
    return out[:, 0]


def extend_attention_flash(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                           qo_indptr: Tensor, prefix_lens: Tensor, sm_scale: float,
                           max_extend_len: int | None = None) -> Tensor:
    """Extend through `flash_attn_with_kvcache`. Its causal mask is bottom-right aligned, so queries
    are LEFT-padded to the longest extend: real row i of sequence b then sees kv <= prefix_b + i."""
    _flash_check(k_pool)
    from flash_attn import flash_attn_with_kvcache
    if q.shape[0] == 0:
        return torch.empty_like(q)
    starts = qo_indptr[:-1].long()
    ext_lens = qo_indptr[1:].long() - starts
    max_ext = int(ext_lens.max()) if max_extend_len is None else max_extend_len
    i = torch.arange(max_ext, device=q.device)
    pad = max_ext - ext_lens
    rows = (starts[:, None] + i[None, :] - pad[:, None]).clamp(0, q.shape[0] - 1)
    o = flash_attn_with_kvcache(q[rows], k_pool, v_pool, cache_seqlens=(prefix_lens.long() + ext_lens).int(),
                                block_table=page_table.int(), softmax_scale=sm_scale, causal=True)
    seq, row = _token_rows(qo_indptr, q.shape[0], pad)
    return o[seq, row]
