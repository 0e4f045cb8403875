"""One decoding step of MTA over a KV cache, with the chunk summaries kept between steps.

A decoding step is one query at position t (chunk i = t // c) over the keys and values of the
sequence so far. MTA_SPEC.md's row t reads, besides the query itself:

- its **window**: the keys of chunks i−L+1 … i up to t, exactly,
- the **sinks** before the window, exactly,
- one **summary** per chunk j < i−L+1: the mean k and v of the chunk's keys that the mask allows
  and that are not sinks, logit scale·q·k̄_j + log n_j (n_j = 0: left out); learned summaries
  (``summary_weight`` w [Hkv, d]) weigh those keys by softmax_s(k_s·w) instead of equally,
- with ``top_k``: the tokens of the top_k chunks by scale·q·k̄_j instead of their summaries,
- with ``softcap`` > 0 (Gemma-2's ``attn_logit_softcapping``): every product term, scale·q·k and
  scale·q·k̄_j, soft-capped to softcap·tanh(term / softcap) before the mask and log n_j are added,
  as the op does (top-k ranks by the uncapped term: the same order),
- with a learned **sink logit** per query head (GPT-OSS's ``s_aux``, ``sink_logit`` [Hq]): one more
  token before the sequence, as the prompt's op takes it (``passes.lower.sink_logit_operands``):
  at position 0, one more sink, its logit the sink logit and its value zero, the real tokens one
  position later (so chunk j holds tokens jc − 1 … jc + c − 2). Nothing is copied: the keys are
  read one position back, a zero row standing for the sink token.

Chunks j < i−L+1 all lie wholly before t, so their sums do not change as the sequence grows:
:class:`ChunkSums` keeps them, and each step sums only the chunks that left the window since the
last one (c keys every c steps). A step so reads c·L + sinks + n/c + top_k·c keys and summaries
instead of the n keys exact attention reads: O(√n) per token at c ≈ √n, where exact is O(n).

The mask of a step is one row per sequence (``allowed``, [B, n]: which keys the query may see,
key padding, a static cache's empty slots), so every summary is the masked mean MTA_SPEC.md asks
for, and without top-k the step's output is the one-prompt op's row t. With top-k the step ranks
the distant chunks by its own query: a prompt ranks them by the mean query of the chunk, which
includes queries after t that a step does not have (with every query of chunk i equal to the
step's, the two agree: what the tests check against the float64 reference).

Grouped-query attention: the G = Hq / Hkv query heads of a key/value head are G rows over its
keys, summaries and sums; nothing is repeated to Hq heads except the top-k tokens each query head
selects. Float32 throughout (the sums too), the output in q's dtype. A configuration per group
of query heads (``HeadGroups``): :func:`grouped_decode_step`. Boundary chunks (chunks that follow
the text's segments, each sequence its own): :func:`boundary_decode_step`, the same row with the
chunks read from the sequence's chunk bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import MTAConfig
from .chunked import soft_capped


@dataclass
class ChunkSums:
    """The summaries of the first M chunks of c tokens of a sequence: the means of k and v
    ([B, Hkv, M, d], float32; zeros for an empty chunk) over each chunk's allowed non-sink keys,
    their counts ([B, M]) and logit offsets (``offset``, [B, M]: log n_j, −inf where n_j = 0), and
    the mask they were taken under (``allowed``: [B, M·c] bool, None when every key was allowed),
    the learned summary weight they were taken with (``weight`` [Hkv, d], None: means) and the
    position of the cache's first key (``shift``: 1 after a sink logit's token, else 0):
    what a decoding step's summaries are. Valid for a cache whose first M·c keys and values have
    not changed since; ``use_mta`` keeps them on each cache layer (one per head group and run of
    key/value heads: :func:`grouped_decode_step`) and drops them when the layer is reordered,
    cropped or reset (``interface``)."""

    chunk_size: int
    sinks: int
    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    offset: torch.Tensor
    allowed: torch.Tensor | None
    weight: torch.Tensor | None = None
    shift: int = 0

    @property
    def chunks(self) -> int:
        return self.count.shape[1]

    def serves(self, key: torch.Tensor, allowed: torch.Tensor | None, chunk_size: int, sinks: int,
               weight: torch.Tensor | None = None, shift: int = 0) -> bool:
        """Whether these summaries can be extended for ``key`` (the cache's keys, from position
        ``shift``) under ``allowed``: same chunking, summary weight, shift, batch, heads, width and
        device, and the mask over the summarised keys unchanged."""
        if not _laid_out_alike(self, key, chunk_size, sinks, shift) or self.chunks * chunk_size > key.shape[2] + shift:
            return False
        return _taken_alike(self.allowed, self.weight, allowed, weight, self.chunks * chunk_size)

    def first(self, chunks: int) -> "ChunkSums":
        """The summaries of the first ``chunks`` chunks only (views)."""
        mask = None if self.allowed is None else self.allowed[:, :chunks * self.chunk_size]
        return ChunkSums(self.chunk_size, self.sinks, self.k[:, :, :chunks], self.v[:, :, :chunks],
                         self.count[:, :chunks], self.offset[:, :chunks], mask, self.weight, self.shift)


def _laid_out_alike(sums, key: torch.Tensor, chunk_size: int, sinks: int, shift: int) -> bool:
    """Whether ``sums`` (:class:`ChunkSums` or :class:`BoundarySums`) were taken with this chunk
    size, sinks and shift over keys of ``key``'s batch, heads, width and device."""
    B, H, _, d = key.shape
    return (sums.chunk_size, sums.sinks, sums.shift) == (chunk_size, sinks, shift) \
        and tuple(sums.k.shape[:2]) == (B, H) and sums.k.shape[3] == d and sums.k.device == key.device


def _taken_alike(mask: torch.Tensor | None, weight: torch.Tensor | None, allowed: torch.Tensor | None,
                 given: torch.Tensor | None, span: int) -> bool:
    """Whether summaries taken under ``mask`` ([B, span] bool, None: every key allowed) with the
    summary weight ``weight`` (None: means) serve a step under ``allowed`` with ``given``: the same
    weight, and the same mask over the first ``span`` keys."""
    if (given is None) != (weight is None) or (given is not None and not torch.equal(given, weight)):
        return False
    if allowed is None or span == 0:
        return mask is None or bool(mask.all())
    if allowed.shape[1] < span:
        return False
    before = allowed[:, :span]
    return bool(before.all()) if mask is None else torch.equal(mask, before)


def chunk_sums(key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, chunks: int,
               chunk_size: int, sinks: int, previous: ChunkSums | None = None,
               weight: torch.Tensor | None = None, shift: int = 0) -> ChunkSums:
    """:class:`ChunkSums` of the first ``chunks`` chunks of ``key``, ``value`` [B, Hkv, n, d] under
    ``allowed`` ([B, ≥ chunks·c] bool or None), means or with learned summaries (``weight`` w
    [Hkv, d]: each chunk's kept keys weighed by softmax_s(k_s·w)), reusing ``previous`` (which must
    ``serve`` them: only its missing chunks are summarised; more chunks than asked are cut).
    ``shift``: the position of the first key (1: after a sink logit's token, which is a sink;
    ``allowed`` and the chunks count positions from that token)."""
    B, H, _, d = key.shape
    c = chunk_size
    if previous is None:
        empty = key.new_zeros(B, 0, dtype=torch.float32)
        previous = ChunkSums(c, sinks, key.new_zeros(B, H, 0, d, dtype=torch.float32),
                             key.new_zeros(B, H, 0, d, dtype=torch.float32), empty, empty, None,
                             None if weight is None else weight.float(), shift)
    done = previous.chunks
    if done >= chunks:
        return previous if done == chunks else previous.first(chunks)
    lo, hi = done * c, chunks * c
    kept = torch.ones(B, hi - lo, dtype=torch.float32, device=key.device)
    if allowed is not None:
        kept = kept * allowed[:, lo:hi]
    if sinks > lo:
        kept[:, :min(sinks, hi) - lo] = 0  # (sinks are attended exactly, never summarised)
    kept = kept.view(B, 1, chunks - done, c)
    count = kept.sum(-1)[:, 0]
    kc = _span(key, lo, hi, shift).float().view(B, H, chunks - done, c, d)
    vc = _span(value, lo, hi, shift).float().view(B, H, chunks - done, c, d)
    if previous.weight is None:  # the mean of the kept keys
        share = (kept / count.clamp(min=1)[:, None, :, None]).expand(B, H, -1, -1)
    else:  # softmax over the kept keys of k_s·w (an empty chunk: zeros)
        logit = torch.einsum("bhmcd,hd->bhmc", kc, previous.weight).masked_fill(kept == 0, float("-inf"))
        share = torch.softmax(logit, dim=-1).nan_to_num_(0.0)
    ks = torch.einsum("bhmcd,bhmc->bhmd", kc, share)
    vs = torch.einsum("bhmcd,bhmc->bhmd", vc, share)
    offset = torch.where(count > 0, count.clamp(min=1).log(), float("-inf"))
    if allowed is None and previous.allowed is None:
        mask = None
    else:
        before = previous.allowed if previous.allowed is not None else \
            torch.ones(B, lo, dtype=torch.bool, device=key.device)
        now = allowed[:, lo:hi] if allowed is not None else torch.ones(B, hi - lo, dtype=torch.bool, device=key.device)
        mask = torch.cat([before, now.bool()], dim=1)
    return ChunkSums(c, sinks, torch.cat([previous.k, ks], dim=2), torch.cat([previous.v, vs], dim=2),
                     torch.cat([previous.count, count], dim=1), torch.cat([previous.offset, offset], dim=1), mask,
                     previous.weight, shift)


def _positions(allowed: torch.Tensor | None, length: int, sinks: int, sink_logit: torch.Tensor | None):
    """A step's mask (``allowed`` [B, ≥ length] cut to ``length``, bool), length and sinks counted
    in positions, and the position of the cache's first key: with a learned sink logit, the
    prompt's op puts one more token first (every position one later, one more sink, that token
    allowed for every query); without, as given and 0."""
    if allowed is not None:
        allowed = allowed[:, :length].bool()
    if sink_logit is None:
        return allowed, length, sinks, 0
    if allowed is not None:
        allowed = torch.nn.functional.pad(allowed, (1, 0), value=True)
    return allowed, length + 1, sinks + 1, 1


def _span(x: torch.Tensor, lo: int, hi: int, shift: int) -> torch.Tensor:
    """Positions [lo, hi) of a cache ``x`` [B, H, n, d] whose first entry is at position ``shift``
    (a view; the positions before it, a sink logit's token, zero rows)."""
    if lo >= shift:
        return x[:, :, lo - shift:hi - shift]
    return torch.nn.functional.pad(x[:, :, :max(hi - shift, 0)], (0, 0, shift - lo, 0))


def decode_step(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, length: int,
                config: MTAConfig, scale: float | None = None, sums: ChunkSums | None = None,
                summary_weight: torch.Tensor | None = None, softcap: float = 0.0,
                sink_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, ChunkSums]:
    """MTA for one query per sequence at position t = length − 1 (module docstring). ``q``
    [B, Hq, 1, d]; ``key``, ``value`` [B, Hkv, ≥ length, d], the sequence's first ``length``
    tokens (slots after them are ignored: a static cache's); ``allowed`` [B, ≥ length] bool or
    None: the keys the query may see. ``sums``: the chunk summaries of an earlier step over the
    same cache, extended here (None: summarised from the start). ``summary_weight`` [Hkv, d]:
    learned summaries (MTA_SPEC.md's ``summary="learned"``). ``softcap`` > 0: soft-capped logits;
    ``sink_logit`` [Hq]: learned sink logits, one more token at position 0 (module docstring; the
    configuration's sinks count the real tokens, as the site's: one more sink is added here, as
    ``passes.lower.with_sink_token`` adds it to a prompt's). Returns the output [B, Hq, 1, d] in
    q's dtype and the summaries to pass to the next step. A query that may see no key gets zeros.

    One product of the G query heads of each key/value head with [sinks; window; summaries] (their
    logit offsets: 0 or −inf by the mask, log n_j), and with top-k one more with each query head's
    selected chunks' tokens (gathered by whole chunks) whose summaries it then leaves out."""
    B, Hq, m, d = q.shape
    Hkv = key.shape[1]
    if m != 1 or Hq % Hkv or length < 1 or key.shape[2] < length:
        raise ValueError(f"decode_step takes one query per sequence over at least `length` keys: q {list(q.shape)}, "
                         f"k {list(key.shape)}, length {length}")
    G = Hq // Hkv
    c, L, top_k = config.chunk_size, config.local_chunks, config.top_k
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    allowed, length, S, shift = _positions(allowed, length, config.sinks, sink_logit)
    t = length - 1
    start = max(0, t // c - L + 1) * c  # the window's first key; the chunks before it are summarised
    J = start // c
    s = min(S, start)  # the sinks outside the window
    weight = None if summary_weight is None else summary_weight.to(device=key.device, dtype=torch.float32)
    if sums is None or not sums.serves(key, allowed, c, S, weight, shift):
        sums = None
    sums = chunk_sums(key, value, allowed, J, c, S, sums, weight, shift)
    no = float("-inf")
    exact = [(0, s), (start, length)] if s else [(start, length)]
    keys = torch.cat([_span(key, lo, hi, shift).float() for lo, hi in exact] + [sums.k], dim=2)
    values = torch.cat([_span(value, lo, hi, shift).float() for lo, hi in exact] + [sums.v], dim=2)
    if allowed is None:
        offset = torch.cat([sums.offset.new_zeros(B, s + length - start), sums.offset], dim=1)
    else:
        seen = torch.cat([allowed[:, lo:hi] for lo, hi in exact], dim=1)
        offset = torch.cat([torch.where(seen, 0.0, no), sums.offset], dim=1)
    qg = q.reshape(B, Hkv, G, d).float() * scale
    scores = qg @ keys.transpose(-1, -2)  # [B, Hkv, G, s + window + J]
    if shift:  # position 0, the first exact key (a sink or the window's first): the sink logit
        scores[..., 0] = sink_logit.to(device=q.device, dtype=torch.float32).view(Hkv, G)

    def take(chosen: torch.Tensor):  # whole chunks: c contiguous keys each
        position = (chosen[..., None] * c + torch.arange(c, device=q.device)).flatten(-2)
        if shift:  # chunks not aligned to the cache: by token (the sink token, a sink, is never taken)
            k_sel, v_sel = _tokens(key, value, (position - shift).clamp(min=0))
        else:
            k_sel, v_sel = _whole_chunks(key, chosen, c), _whole_chunks(value, chosen, c)
        return k_sel, v_sel, position, position < J * c

    out = _attend(qg, scores, offset, values, sums.offset.shape[1], top_k, S, allowed, take, softcap)
    return out.reshape(B, Hq, 1, d).to(q.dtype), sums


@dataclass
class BoundarySums:
    """Boundary chunks' summaries of each sequence's first chunks (those before the window of an
    earlier step; complete, so they never change): the means of k and v over each chunk's allowed
    non-sink keys ([B, Hkv, M, d] float32, zeros for an empty chunk), their counts and logit
    offsets ([B, M]: log n_j, −inf for none), how many chunks of each sequence they hold (``done``
    [B]; the rest of the M slots empty), those chunks' bounds (``bounds`` [B, M + 1]: entries
    0 … done of each row are its chunk starts then the end of its last summarised chunk) and the
    mask over the keys they cover (``allowed`` [B, span] or None; span: the longest), the
    learned summary weight they were taken with (``weight`` [Hkv, d], None: means) and the
    position of the cache's first key (``shift``, as :class:`ChunkSums`'). Valid for a cache whose
    first span keys, chunk bounds and mask have not changed since."""

    chunk_size: int
    sinks: int
    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    offset: torch.Tensor
    done: torch.Tensor
    bounds: torch.Tensor
    allowed: torch.Tensor | None
    weight: torch.Tensor | None = None
    shift: int = 0

    def serves(self, key: torch.Tensor, allowed: torch.Tensor | None, bounds: torch.Tensor, chunk_size: int,
               sinks: int, chunks: torch.Tensor, weight: torch.Tensor | None = None, shift: int = 0) -> bool:
        """Whether these sums can be extended to ``chunks`` ([B]) chunks per sequence of ``key``
        under ``allowed``, the chunk ``bounds`` of this step, summary ``weight`` and ``shift``."""
        held = self.k.shape[2]
        if not _laid_out_alike(self, key, chunk_size, sinks, shift) \
                or held >= bounds.shape[1] or held > int(chunks.max()) or bool((self.done > chunks).any()):
            return False
        final = torch.arange(held + 1, device=key.device) <= self.done[:, None]  # (later entries were not yet known)
        if not bool(((self.bounds == bounds[:, :held + 1]) | ~final).all()):
            return False
        return _taken_alike(self.allowed, self.weight, allowed, weight,
                            int(self.bounds.gather(1, self.done[:, None]).max()))


def boundary_decode_step(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                         length: int, config: MTAConfig, bounds: torch.Tensor, scale: float | None = None,
                         sums: BoundarySums | None = None, summary_weight: torch.Tensor | None = None,
                         softcap: float = 0.0,
                         sink_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, BoundarySums]:
    """:func:`decode_step` under boundary chunks: ``bounds`` [B|1, M + 1], each sequence's chunk
    starts in order and then its length or more (``ops.segments.chunk_bounds`` of its segment ids
    with this chunk size and sinks; of this sequence or a longer one: entries from ``length`` on
    are cut to it). Chunk i of position t = length − 1 and the L − 1 before it are the window, the
    sinks before the window exact, one summary per earlier chunk (its mean over allowed non-sink
    keys, logit + log n_j; learned summaries, ``summary_weight`` w [Hkv, d]: weighted by
    softmax_s(k_s·w) over the chunk), with top-k the tokens of the top_k chunks instead: each
    sequence with its own chunks, so its own window start and number of summaries (the batch padded
    to the most, the rest forbidden). The summarised chunks are complete (they end before chunk i starts), so
    their summaries are kept (:class:`BoundarySums`) and a step adds only the chunks that left the
    window since the last. ``softcap``, ``sink_logit``: as :func:`decode_step`'s; with sink logits
    ``bounds`` are those of the sequence with the sink token first (``chunk_bounds`` of
    ``passes.lower.sink_token_segments`` of its segment ids, with one more sink), as the prompt's
    op chunks it."""
    B, Hq, m, d = q.shape
    Hkv = key.shape[1]
    if m != 1 or Hq % Hkv or length < 1 or key.shape[2] < length or bounds.dim() != 2 \
            or bounds.shape[0] not in (1, B) or int(bounds[:, -1].min()) < length + (sink_logit is not None):
        raise ValueError(f"decode_step takes one query per sequence over at least `length` keys and chunk bounds "
                         f"reaching it: q {list(q.shape)}, k {list(key.shape)}, bounds {list(bounds.shape)}, "
                         f"length {length}")
    G, dev, no = Hq // Hkv, q.device, float("-inf")
    c, L, top_k = config.chunk_size, config.local_chunks, config.top_k
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    allowed, length, S, shift = _positions(allowed, length, config.sinks, sink_logit)
    bounds = bounds.long().clamp(max=length).expand(B, -1)
    last = (bounds < length).sum(1) - 1  # [B]: chunk i, the step's
    J = (last - L + 1).clamp(min=0)  # [B]: the chunks before the window, summarised
    start = bounds.gather(1, J[:, None])[:, 0]  # [B]: the window's first key
    weight = None if summary_weight is None else summary_weight.to(device=dev, dtype=torch.float32)
    if sums is None or not sums.serves(key, allowed, bounds, c, S, J, weight, shift):
        sums = None
    sums = _boundary_sums(key, value, allowed, bounds, J, c, S, sums, weight, shift)
    # the exact keys: the sinks before the window, then the window (each sequence padded to the most)
    W = int((length - start).max())
    sink, window = torch.arange(S, device=dev).expand(B, -1), start[:, None] + torch.arange(W, device=dev)
    index = torch.cat([sink, window], dim=1).clamp(max=length - 1)
    seen = torch.cat([sink < start.clamp(max=S)[:, None], window < length], dim=1)
    if allowed is not None:
        seen &= allowed.gather(1, index)
    rows = (index - shift).clamp(min=0)[:, None, :, None].expand(B, Hkv, -1, d)
    keys = torch.cat([key.gather(2, rows).float(), sums.k], dim=2)
    values = torch.cat([value.gather(2, rows).float(), sums.v], dim=2)
    offset = torch.cat([torch.where(seen, 0.0, no), sums.offset], dim=1)
    qg = q.reshape(B, Hkv, G, d).float() * scale
    scores = qg @ keys.transpose(-1, -2)
    if shift:  # the sink token (position 0: a sink, or the window's first key): the sink logit, value 0
        token = torch.nn.functional.pad(seen & (index == 0), (0, sums.k.shape[2]))[:, None, None, :]
        scores = torch.where(token, sink_logit.to(device=dev, dtype=torch.float32).view(Hkv, G, 1), scores)
        values.masked_fill_(token[:, :, 0, :, None], 0.0)

    def take(chosen: torch.Tensor):  # chunk j's tokens: c keys from its start, those before its end
        first = bounds.gather(1, chosen.flatten(1)).view_as(chosen)
        end = bounds.gather(1, (chosen + 1).flatten(1)).view_as(chosen)
        position = (first[..., None] + torch.arange(c, device=dev)).flatten(-2)
        inside = position < end.repeat_interleave(c, dim=-1)
        k_sel, v_sel = _tokens(key, value, (position.clamp(max=length - 1) - shift).clamp(min=0))
        return k_sel, v_sel, position, inside

    out = _attend(qg, scores, offset, values, sums.offset.shape[1], top_k, S, allowed, take, softcap)
    return out.reshape(B, Hq, 1, d).to(q.dtype), sums


def _whole_chunks(x: torch.Tensor, chosen: torch.Tensor, c: int) -> torch.Tensor:
    """The c positions of each chosen chunk of a cache ``x`` [B, Hkv, n, d] (chunk j: positions
    jc … jc + c − 1, all below n), ``chosen`` [B, Hkv, G, K] (each query head its own), as
    [B, Hkv, G, K·c, d] float32. One ``index_select`` over a view of x whose rows are all its
    windows of c consecutive positions (each chunk one contiguous block, copied whole). A layout
    where one head or sequence does not start a whole number of positions after the one before
    (a [B, n, H, d] cache transposed: heads one row of d apart, positions H rows) has no such
    view: advanced indexing, which copies element by element (on the CPU that copy took 2.5–3×
    as long: 252 against 88 µs for k at 2K, top_k 2, 9 / 3 heads, c = 128, a loaded box)."""
    B, H, n, d = x.shape
    sB, sH, sT, sD = (0 if size == 1 else stride for size, stride in zip(x.shape, x.stride()))
    G, K = chosen.shape[2:]
    if sT > 0 and sB % sT == 0 and sH % sT == 0:
        heads = torch.arange(B, device=x.device)[:, None] * (sB // sT) + torch.arange(H, device=x.device) * (sH // sT)
        starts = heads[:, :, None, None] + chosen * c  # (in positions from x's first)
        count = (B - 1) * (sB // sT) + (H - 1) * (sH // sT) + n - c + 1  # (the last window ends at x's last)
        windows = x.as_strided((count, c, d), (sT, sT, sD), x.storage_offset())
        return windows.index_select(0, starts.flatten()).float().view(B, H, G, K * c, d)
    rows = (torch.arange(B, device=x.device)[:, None, None, None], torch.arange(H, device=x.device)[:, None, None],
            chosen)
    return x[:, :, :n // c * c].unflatten(2, (n // c, c))[rows].float().view(B, H, G, K * c, d)


def _tokens(key: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [B, Hkv, G, t, d] (float32) at cache positions ``index`` [B, Hkv, G, t]
    (each query head its own), by advanced indexing: 57 µs for k at 8K and top_k 2 (9 / 3 heads,
    c = 128), where ``gather`` over an index expanded to d took 80."""
    B, Hkv = key.shape[:2]
    rows = (torch.arange(B, device=key.device)[:, None, None, None],
            torch.arange(Hkv, device=key.device)[:, None, None], index)
    return key[rows].float(), value[rows].float()


def _boundary_sums(key, value, allowed, bounds, J, c: int, sinks: int, previous: BoundarySums | None,
                   weight: torch.Tensor | None = None, shift: int = 0) -> BoundarySums:
    """``previous`` (or nothing) extended to the first ``J`` ([B]) chunks of each sequence: the
    chunks [done, J) of each, summarised in one pass over the keys they span (means, or with
    ``weight`` w the softmax_s(k_s·w)-weighted averages). ``shift``: as :func:`chunk_sums`'."""
    B, H, _, d = key.shape
    dev = key.device
    done = torch.zeros(B, dtype=torch.long, device=dev) if previous is None else previous.done
    if previous is not None and torch.equal(done, J):
        return previous
    width = int(J.max())
    lo, hi = int(bounds.gather(1, done[:, None]).min()), int(bounds.gather(1, J[:, None]).max())
    position = torch.arange(lo, hi, device=dev)
    part = torch.searchsorted(bounds, position.expand(B, -1).contiguous(), right=True) - 1  # each key's chunk
    kept = (part >= done[:, None]) & (part < J[:, None]) & (position >= sinks)
    if allowed is not None:
        kept &= allowed[:, lo:hi]
    kept = kept.float()
    slot = part.clamp(min=0, max=max(width - 1, 0))
    count = kept.new_zeros(B, width).scatter_add_(1, slot, kept)
    keys = _span(key, lo, hi, shift).float()
    if weight is None:  # (a new chunk's keys: 1 / n_j each)
        share = (kept / count.clamp(min=1).gather(1, slot))[:, None, :, None]
    else:  # softmax over each chunk's kept keys of k_s·w: less the chunk's largest, exp, over the chunk's sum
        logit = torch.einsum("bhtd,hd->bht", keys, weight).masked_fill(kept[:, None] == 0, float("-inf"))
        slots = slot[:, None].expand(B, H, -1)
        top = logit.new_full((B, H, width), float("-inf")).scatter_reduce(2, slots, logit, "amax")
        e = (logit - top.gather(2, slots)).exp().nan_to_num_(0.0)
        total = logit.new_zeros(B, H, width).scatter_add_(2, slots, e)
        share = (e / total.gather(2, slots).clamp(min=1e-30))[..., None]
    rows = slot[:, None, :, None].expand(B, H, -1, d)
    k = key.new_zeros(B, H, width, d, dtype=torch.float32).scatter_add_(2, rows, keys * share)
    v = torch.zeros_like(k).scatter_add_(2, rows, _span(value, lo, hi, shift).float() * share)
    if previous is not None:  # (its chunks' slots are empty in the new sums: added, not mixed)
        held = previous.k.shape[2]
        k[:, :, :held] += previous.k
        v[:, :, :held] += previous.v
        count[:, :held] += previous.count
    offset = torch.where(count > 0, count.clamp(min=1).log(), float("-inf"))
    span = int(bounds.gather(1, J[:, None]).max())
    return BoundarySums(c, sinks, k, v, count, offset, J.clone(), bounds[:, :width + 1].clone(),
                        None if allowed is None else allowed[:, :span].clone(), weight, shift)


def grouped_decode_step(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None,
                        length: int, groups, scale: float | None = None, sums: dict | None = None,
                        summary_weight: torch.Tensor | None = None, chunk_bounds=None,
                        softcap: float = 0.0, sink_logit: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """:func:`decode_step` with a configuration per group of query heads (``HeadGroups.groups``:
    (MTAConfig or None for exact, query heads)), as ``passes.lower.grouped_attention`` computes a
    prompt: each head's output is its group's. A group runs over the key/value heads its query
    heads read, by contiguous runs of them (views of the cache, nothing copied: all G query heads
    of a run are computed, those of other groups dropped); an exact group is SDPA over the first
    ``length`` keys under ``allowed`` (zeros for a query that may see nothing, as decode_step;
    with ``softcap`` or ``sink_logit`` [Hq], the softmax of the capped logits and the sink logit,
    which SDPA cannot take).
    ``sums``: what the last step returned (one :class:`ChunkSums` per group and run), or None.
    ``chunk_bounds``: boundary chunks (:func:`boundary_decode_step`), a function of (chunk size,
    sinks) giving the chunk bounds [B, M + 1] (with ``sink_logit``, of the sequence with the sink
    token first: :func:`boundary_decode_step`). Returns the
    output [B, Hq, 1, d] in q's dtype and the sums for the next step."""
    B, Hq, m, d = q.shape
    Hkv = key.shape[1]
    if m != 1 or Hq % Hkv:
        raise ValueError(f"decode_step takes one query per sequence: q {list(q.shape)}, k {list(key.shape)}")
    G = Hq // Hkv
    out = q.new_empty(B, Hq, 1, d)
    kept = {}
    for number, (config, heads) in enumerate(groups):
        for a, b in _runs(sorted({h // G for h in heads})):
            rows = slice(a * G, b * G)
            sink = None if sink_logit is None else sink_logit[rows]
            if config is None:
                part = _exact_step(q[:, rows], key[:, a:b], value[:, a:b], allowed, length, scale, softcap, sink)
            else:
                weight = None if summary_weight is None else summary_weight[a:b]
                previous = (sums or {}).get((number, a, b))
                if chunk_bounds is not None:
                    part, kept[number, a, b] = boundary_decode_step(
                        q[:, rows], key[:, a:b], value[:, a:b], allowed, length, config,
                        chunk_bounds(config.chunk_size, config.sinks), scale, previous, weight, softcap, sink)
                else:
                    part, kept[number, a, b] = decode_step(q[:, rows], key[:, a:b], value[:, a:b], allowed, length,
                                                           config, scale, previous, weight, softcap, sink)
            mine = [h for h in heads if a * G <= h < b * G]
            if len(mine) == (b - a) * G:  # (every query head of the run is the group's)
                out[:, rows] = part
            else:
                index = torch.tensor(mine, device=q.device)
                out.index_copy_(1, index, part.index_select(1, index - a * G))
    return out, kept


def _exact_step(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor | None, length: int,
                scale: float | None, softcap: float = 0.0, sink_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of one query per sequence over the first ``length`` keys under ``allowed``
    [B, ≥ length] (zeros for a query that may see nothing): SDPA, or with ``softcap`` or
    ``sink_logit`` [Hq] (a logit beside the keys' with a value of zero, capped as they are) the
    softmax computed here."""
    B, Hq, _, d = q.shape
    Hkv = key.shape[1]
    key, value = key[:, :, :length], value[:, :, :length]
    if allowed is not None:
        allowed = allowed[:, :length].bool()
    if not softcap and sink_logit is None:
        mask = None if allowed is None else allowed[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale,
                                                                enable_gqa=Hq != Hkv).nan_to_num_(0.0)
    qg = q.reshape(B, Hkv, Hq // Hkv, d).float() * (1.0 / math.sqrt(d) if scale is None else float(scale))
    logits = soft_capped(qg @ key.float().transpose(-1, -2), softcap)
    if allowed is not None:
        logits.masked_fill_(~allowed[:, None, None, :], float("-inf"))
    if sink_logit is not None:
        sink = sink_logit.to(device=q.device, dtype=torch.float32).view(1, Hkv, -1, 1).expand(B, -1, -1, -1)
        logits = torch.cat([soft_capped(sink, softcap), logits], dim=-1)
    p = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return (p[..., -length:] @ value.float()).reshape(B, Hq, 1, d).to(q.dtype)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``indices`` as contiguous [a, b) runs."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _attend(qg: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor, values: torch.Tensor, J: int, top_k: int,
            sinks: int, allowed: torch.Tensor | None, take, softcap: float = 0.0) -> torch.Tensor:
    """A step's output [B, Hkv, G, d] from its product terms ``scores`` (scale·q·k, uncapped) over
    [exact keys; J summaries], their ``offset`` [B, W + J] (the exact keys' 0 or −inf by the mask,
    the summaries' log n_j or −inf for none) and ``values``: softmax(cap(scores) + offset)·values,
    cap the ``softcap`` (0: none). With ``top_k``, each query head's top_k live chunks by
    scale·q·k̄_j (ties: the lower index) attended by their tokens instead of their summaries:
    ``take(chosen)`` ([B, Hkv, G, top_k] chunk indices) gives their keys and values
    [B, Hkv, G, top_k·c, d], positions [B, Hkv, G, top_k·c] and which of them the chunks hold;
    sinks and keys ``allowed`` forbids are left out. Zeros for a row with nothing to see."""
    no = float("-inf")
    logits = soft_capped(scores, softcap) + offset[:, None, None, :]
    if not top_k or not J:
        return torch.softmax(logits, dim=-1).nan_to_num_(0.0) @ values
    live = torch.isfinite(offset[:, -J:])[:, None, None, :]
    ranked = torch.where(live, scores[..., -J:], no)
    ordered, index = ranked.sort(dim=-1, descending=True, stable=True)
    # (fewer live chunks than top_k: the first dead ones, whose logits are −inf already, not taken)
    chosen, taken = index[..., :top_k], ordered[..., :top_k] > no
    logits[..., -J:].scatter_(-1, chosen, no)  # (their tokens instead, exactly:)
    k_sel, v_sel, position, ok = take(chosen)
    per_chunk = position.shape[-1] // chosen.shape[-1]  # (c; top_k may exceed J)
    ok = ok & taken.repeat_interleave(per_chunk, dim=-1) & (position >= sinks)
    if allowed is not None:
        ok &= allowed.gather(1, position.clamp(max=allowed.shape[1] - 1).flatten(1)).view_as(position)
    selected = soft_capped((qg.unsqueeze(-2) @ k_sel.transpose(-1, -2)).squeeze(-2), softcap).masked_fill_(~ok, no)
    p = torch.softmax(torch.cat([logits, selected], dim=-1), dim=-1).nan_to_num_(0.0)
    width = values.shape[2]
    return p[..., :width] @ values + (p[..., None, width:] @ v_sel).squeeze(-2)
