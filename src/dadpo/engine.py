"""Continuous-batching decoder for Llama-family chat models (Llama, Qwen2, Mistral and their dadpo prunes).

`model.generate` decodes a left-padded batch until its longest row ends: every row attends over the padding
of the longest prompt at every step, finished rows keep decoding, and top-p sorts the whole vocabulary.
This engine keeps a fixed number of *slots*, each holding one request's KV cache from position 0 (no
padding). A finished request leaves its slot at once and the next queued prompt is prefilled into it, so
the batch stays full until the queue runs dry (in bf16, the prompts admitted at once are prefilled in one
pass), and the nucleus is looked for among the top candidates.

The decoder layer is written out here with the model's own weights, norms and rotary embedding, in the
order transformers computes it, so float32 greedy decoding gives `model.generate`'s tokens and a dadpo
prune with per-layer widths or a LoRA-merged student runs as is. With `bf16`, the layers' matmuls and
attention run in bfloat16 on oneDNN-prepacked weights (CPUs with AMX or AVX-512 BF16 do them faster) while
the residual stream, the norms, the attention scores and the logits that decide a token stay float32.

A sampled answer depends only on its request's seed and the decoding settings, never on the batch or slot
it landed in: each request draws from its own random stream, and a row's arithmetic does not depend on the
other rows (see `Engine._decode`). For that, sampling a float32 model on a CPU runs on oneDNN-prepacked
products and a written-out decode attention (`_sdpa`'s `row_invariant`): MKL's float32 products and torch's
CPU attention round a row by how many rows share the call (float32 and bf16 attention, measured on an AMD
EPYC). `unsupported(model)` says why a model must go through `model.generate` instead (the reference implementation).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate

import torch

#: model types (after a dadpo prune's `dadpo_pruned_` prefix) whose decoder layers this engine drives
FAMILIES = ("llama", "qwen2", "mistral")
#: cache capacity grows in blocks of this many positions
BLOCK = 256
#: a decode step's row attends over its length rounded up to a multiple of this (a divisor of BLOCK)
SPAN = 64
#: candidates searched first for the top-p nucleus (the output layer's own in bf16)
NUCLEUS_CANDIDATES = 64
#: in bf16, candidates searched next for a nucleus wider than `NUCLEUS_CANDIDATES`, before a full sort (float32
#: sorts at once, so that its sampled answers stay the ones documented so far)
WIDE_CANDIDATES = 1024
#: most rows one prepacked oneDNN product takes at once (decode requests; in bf16 also prompt tokens, except as
#: below): up to 32 rows it computes every row as it would alone, past that some rows round differently
#: (measured on AMX), which would make answers depend on the batch
ROW_BLOCK = 32
#: most prompt tokens one prepacked bf16 layer product takes at once on a CPU with AVX-512 BF16 but no AMX, where
#: oneDNN computes a row the same in calls of 2–4,608 rows (measured on an AMD EPYC with SmolLM2's and its
#: prune's layer weights), so a prefill pass's tokens go in one call, ~20% faster than blocks of `ROW_BLOCK`
WIDE_ROW_BLOCK = 4608
#: torch splits an elementwise op over more elements than this between threads; each piece ends in a scalar
#: loop whose exp can round unlike the vectorized one (float32 SiLU: 4% of such elements)
GRAIN = 32768
#: most prompt tokens prefilled in one pass in bf16 (a longer prompt goes alone): bounds the activations'
#: memory when many long prompts are admitted at once
PREFILL_TOKENS = 4096


def request_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one request from the run's seed and what identifies the request (prompt id, turn)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class Request:
    """One prompt to continue: `key` is the caller's handle, `seed` its own sampling stream."""

    key: object
    input_ids: list[int]
    seed: int = 0


@dataclass
class Result:
    key: object
    tokens: list[int]  # new tokens, without the end-of-turn token
    stopped: bool  # ended at an end-of-turn token (else at max_new_tokens)


@dataclass
class _Row:
    request: Request
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # positions in this row's cache


def _span(positions: int) -> int:
    """The positions a decode step attends over for a row of `positions` (its length rounded up to `SPAN`)."""
    return math.ceil(positions / SPAN) * SPAN


def unsupported(model) -> str | None:
    """Why `model` cannot use the engine (None when it can)."""
    config = getattr(model, "config", None)
    family = str(getattr(config, "model_type", "")).removeprefix("dadpo_pruned_")
    if family not in FAMILIES:
        return f"model type {getattr(config, 'model_type', type(model).__name__)!r} is not one of {FAMILIES}"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(
            model, "lm_head"):
        return f"{type(model).__name__} does not have the Llama module layout (e.g. an unmerged adapter)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (the engine's MLP is SiLU-gated)"
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r} (the engine passes sdpa masks)"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []) or (
            family == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    return None


def resolve_precision(precision: str, model, temperature: float) -> str:
    """`auto` → `bfloat16` for sampled answers of a float32 model that the engine runs on a CPU with bf16
    matrix instructions (AMX, or AVX-512 BF16 as on AMD Zen 4), where bf16 products are 2–6× faster than
    float32 and oneDNN computes every row the same way in products of up to `ROW_BLOCK` rows (`_Linear.whole`
    keeps to that, or to `WIDE_ROW_BLOCK` prompt tokens where that was measured), so answers stay
    batch-invariant; `model` (the model's own dtype) otherwise, so greedy answers equal `model.generate`'s."""
    if precision != "auto":
        return precision
    return "bfloat16" if temperature > 0 and bf16_units(model) else "model"


def bf16_units(model) -> bool:
    """Whether the engine would run `model`'s products faster in bf16 here: a float32 engine model on a CPU
    with oneDNN and AMX or AVX-512 BF16 instructions."""
    return (unsupported(model) is None and model.dtype == torch.float32 and model.device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()))


class _SlotCache:
    """Per-layer K/V of every slot, `[slots, kv_heads, capacity, head_dim]`, each row from position 0; keys in
    `key_dtype` when given (float32 keys of bf16 values: scores summed and kept in float32).

    The buffers are allocated, not zeroed: one long prompt sizes every slot (zeroing the 5 GB of 32 slots at
    4,608 positions took 2.7 s and faulted in memory nothing reads). A row reads its slot up to its `reach`
    (see `Engine._reach`), positions past its length with a zero attention weight, so when a row takes a slot
    the values from its length to its reach are zeroed (a zero weight times a NaN would be NaN), and the keys
    too unless `masked_keys` (the written-out attention overwrites those positions' scores)."""

    def __init__(self, slots: int, n_layers: int, key_dtype: torch.dtype | None = None, masked_keys: bool = False):
        self.slots, self.key_dtype, self.masked_keys = slots, key_dtype, masked_keys
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.capacity = 0

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions per slot (kept rows are copied into the larger buffers)."""
        if capacity <= self.capacity:
            return
        capacity = math.ceil(capacity / BLOCK) * BLOCK
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                if old is not None:
                    new = self._buffer(old, (*old.shape[:2], capacity, old.shape[3]))
                    new[:, :, : self.capacity] = old
                    store[i] = new
        self.capacity = capacity

    def write_prompt(self, layer: int, slot: int, key: torch.Tensor, value: torch.Tensor, reach: int) -> None:
        """Store a prompt's keys/values `[1, kv_heads, n, head_dim]` at the start of `slot`, whose row reads up
        to position `reach`."""
        if self.k[layer] is None:  # first use: this layer's own head count (prunes differ per layer)
            shape = (self.slots, key.shape[1], self.capacity, key.shape[3])
            self.k[layer], self.v[layer] = self._buffer(key, shape, self.key_dtype), self._buffer(value, shape)
        n = key.shape[2]
        self.k[layer][slot, :, :n] = key[0]
        self.v[layer][slot, :, :n] = value[0]
        self._clear(layer, slot, n, reach)

    def write_step(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> None:
        """Store one new token per active slot `[n, kv_heads, 1, head_dim]` at `positions` (`rows` = 0…n−1)."""
        self.k[layer][rows, :, positions] = key[:, :, 0].to(self.k[layer].dtype)
        self.v[layer][rows, :, positions] = value[:, :, 0]

    def move(self, src: int, dst: int, length: int, reach: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compacting the active rows) and clear
        `dst` from there to the row's `reach`."""
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            if k is not None:
                k[dst, :, :length] = k[src, :, :length]
                v[dst, :, :length] = v[src, :, :length]
                self._clear(layer, dst, length, reach)

    @staticmethod
    def _buffer(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return like.new_empty(shape, dtype=dtype)

    def _clear(self, layer: int, slot: int, start: int, stop: int) -> None:
        self.v[layer][slot, :, start:stop] = 0
        if not self.masked_keys:
            self.k[layer][slot, :, start:stop] = 0


class _Linear:
    """Projections that read one input. With the model's own weights, one product each, as transformers
    computes them. `packed`: one product for all of them on a concatenated copy (bfloat16 with `dtype`, else
    the model's float32) that oneDNN prepacks once, whose rows come out the same whatever else is in the
    product (up to `ROW_BLOCK` rows; in bf16 on AVX-512 BF16 without AMX, `WIDE_ROW_BLOCK`); oneDNN also
    multiplies faster with it, and repacking a plain weight on every call would cost about as much as the
    product itself."""

    def __init__(self, modules: list[torch.nn.Linear], dtype: torch.dtype | None, packed: bool):
        self.sizes = [m.out_features for m in modules]
        self.parts = [(m.weight, m.bias) for m in modules]
        self.packed = None
        self.token_blocks = dtype is not None
        wide = torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported()
        self.prompt_block = WIDE_ROW_BLOCK if self.token_blocks and wide else ROW_BLOCK
        own = modules[0].weight
        onednn = own.device.type == "cpu" and torch.backends.mkldnn.is_available()
        if dtype is not None or (packed and onednn and own.dtype == torch.float32):
            weight = torch.cat([m.weight.detach() for m in modules]).to(dtype or own.dtype)
            biases = [m.bias for m in modules]
            bias = None if all(b is None for b in biases) else torch.cat(
                [b.detach() if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.sizes,
                                                                                      strict=True)]).to(weight.dtype)
            self.parts = [(weight, bias)]
            if onednn:
                # packed for batches of 32 rows. On AMX the ROW_BLOCK limit is the kernel's, not this hint's
                # (hints 32, 64 and 128 all round rows differently past 32); a hint of 1 does not, but it
                # rounds prompts of more than 32 tokens differently, which would change every sampled answer
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
                self.parts = [(None, bias)]  # the packed copy is the only one a product reads

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The projections of `x` `[requests, tokens, features]`, one tensor each."""
        if self.packed is None and len(self.parts) > 1:
            return tuple(torch.nn.functional.linear(x, *p) for p in self.parts)
        out = self.whole(x)
        return out.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (out,)

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """The projections of `x` side by side in one tensor. A prepacked product takes at most `ROW_BLOCK`
        rows at once: requests (a decode step's rows, the output layer's), and in float32 a prompt stays one
        product (splitting it would round its prefill differently from the answers documented so far); in
        bf16 a prefill's token rows, whichever prompts they come from (prompts prefilled together), go in
        blocks of `self.prompt_block` (`WIDE_ROW_BLOCK` on AVX-512 BF16 without AMX, else `ROW_BLOCK`)."""
        if self.packed is None:
            outs = [torch.nn.functional.linear(x, *p) for p in self.parts]
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        prompt = self.token_blocks and x.shape[-2] > 1
        rows, block = (x.reshape(-1, 1, x.shape[-1]), self.prompt_block) if prompt else (x, ROW_BLOCK)
        if rows.shape[0] <= block:
            return self._packed_product(x)
        return torch.cat([self._packed_product(part) for part in rows.split(block)]).view(*x.shape[:-1], -1)

    def _packed_product(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1:
            # oneDNN multiplies one row another way than two or more on some CPUs (measured on an AMD EPYC for
            # 1,536 inputs, float32 and bf16), so a lone row goes with a copy of itself
            return self._packed_product(torch.cat([flat, flat]))[:1].view(*x.shape[:-1], -1)
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.parts[0][1], "none", [],
                                                  "").view(*x.shape[:-1], -1)


@dataclass
class _Layer:
    """One decoder layer's weights as the engine uses them (the model's own tensors, or bf16 copies)."""

    module: torch.nn.Module  # for its norms
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @classmethod
    def of(cls, layer, dtype: torch.dtype | None, packed: bool) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim

        def linear(*modules):
            return _Linear(list(modules), dtype, packed)

        return cls(layer, linear(attn.q_proj, attn.k_proj, attn.v_proj), linear(attn.o_proj),
                   linear(mlp.gate_proj, mlp.up_proj), linear(mlp.down_proj),
                   attn.q_proj.out_features // d, attn.k_proj.out_features // d, d, attn.scaling)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa(q, k, v, layer: _Layer, *, causal: bool = False, mask: torch.Tensor | None = None,
          row_invariant: bool = False) -> torch.Tensor:
    """Scaled dot-product attention as transformers' sdpa integration calls it, as `[n, t, heads·head_dim]`:
    a prompt attends causally with grouped key/value heads; a decode step (one query per row, `mask` of the
    visible positions) packs each key/value head's query heads as its queries. `row_invariant` (a decode
    step): softmax(q·kᵀ)·v written out in batched products, each row's alone, because torch's CPU kernel
    (float32; bf16 on AVX-512 BF16) splits its sums by the number of rows and so rounds a row differently in
    another batch. Scores and softmax in the keys' dtype (float32 keys for bf16 queries and values), the
    weights cast to the values' dtype."""
    n, _, t, d = q.shape
    groups = layer.heads // layer.kv_heads
    if mask is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=layer.scaling, is_causal=causal and t > 1, **({"enable_gqa": True} if groups > 1 else {}))
    else:
        packed = q.reshape(n, layer.kv_heads, groups, d) if groups > 1 else q
        if row_invariant:
            scores = torch.matmul(packed.to(k.dtype), k.transpose(-1, -2)).mul_(layer.scaling)
            scores.masked_fill_(~mask, -math.inf)
            out = torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=layer.scaling)
        out = out.reshape(n, -1, t, d)
    return out.transpose(1, 2).reshape(n, t, -1)


class Engine:
    """Decode requests with up to `slots` of them in flight; `stream` yields each as soon as it ends.

    `bf16`: the decoder layers' matmuls, attention values and output layer in bfloat16 (weights copied
    once), the residual stream, norms, attention scores and each row's top candidate logits in the model's
    float32 — for CPUs with bf16 matrix instructions (`bf16_units`)."""

    def __init__(self, model, end_ids: list[int], *, slots: int, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, bf16: bool = False):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"the decode engine cannot run this model: {reason}")
        self.model, self.slots = model, slots
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.end_ids = set(end_ids)
        self.device = next(model.parameters()).device
        self.compute_dtype = torch.bfloat16 if bf16 else None
        # sampled: prepacked products, so that a row's numbers (and its sample) never depend on the batch;
        # float32 greedy: the model's own products, whose tokens equal model.generate's
        packed = bf16 or temperature > 0
        # torch's CPU attention rounds a row by its batch in float32 and in bf16 (AVX-512 BF16): `_sdpa`'s
        # row_invariant instead, its scores from float32 keys in bf16 as flash attention sums them
        self.row_invariant_attention = (packed and self.device.type == "cpu"
                                        and model.dtype == torch.float32)
        self.layers = [_Layer.of(layer, self.compute_dtype, packed)
                       for layer in model.model.layers[: model.config.num_hidden_layers]]
        self.head = _Linear([model.lm_head], self.compute_dtype, packed)
        self.cache = _SlotCache(slots, len(self.layers),
                                torch.float32 if bf16 and self.row_invariant_attention else None,
                                masked_keys=self.row_invariant_attention)

    @torch.inference_mode()
    def stream(self, queue: deque[Request]) -> Iterator[Result]:
        """Yield a `Result` for every request taken from `queue` as it finishes; the caller may append new
        requests (e.g. a conversation's next turn) to `queue` between results."""
        rows: list[_Row | None] = []  # by slot; None: a slot freed this step
        while queue or rows:
            self._admit(rows, queue)
            while finished := [k for k, row in enumerate(rows) if row is not None and self._finished(row)]:
                for k in finished:
                    row, rows[k] = rows[k], None
                    stopped = row.tokens[-1] in self.end_ids
                    yield Result(row.request.key, row.tokens[:-1] if stopped else row.tokens, stopped)
                self._admit(rows, queue)  # the new rows may themselves be finished (one-token answers)
            self._compact(rows)
            if rows:
                self._decode(rows)

    def _finished(self, row: _Row) -> bool:
        return row.tokens[-1] in self.end_ids or len(row.tokens) >= self.max_new_tokens

    def _admit(self, rows: list[_Row | None], queue: deque[Request]) -> None:
        """Prefill queued requests into the free slots. In bf16 they go through the layers together, up to
        `PREFILL_TOKENS` prompt tokens a pass, their products computing each token row as it would alone (in
        blocks of `_Linear.prompt_block` rows); a float32 prompt is one product of its own, whose rounding its
        length decides, so float32 admits one at a time."""
        free = [k for k, row in enumerate(rows) if row is None] + list(range(len(rows), self.slots))
        while queue and free:
            requests = [queue.popleft()]
            tokens = len(requests[0].input_ids)
            while (self.compute_dtype is not None and queue and len(requests) < len(free)
                   and tokens + len(queue[0].input_ids) <= PREFILL_TOKENS):
                tokens += len(queue[0].input_ids)
                requests.append(queue.popleft())
            slots, free = free[: len(requests)], free[len(requests):]
            self.cache.reserve(max(len(r.input_ids) for r in requests) + self.max_new_tokens)
            for slot, row in zip(slots, self._prefill(requests, slots), strict=True):
                if slot < len(rows):
                    rows[slot] = row
                else:
                    rows.append(row)

    def _reach(self, request: Request) -> int:
        """How far a request's decode steps may read its slot: at least its last step's span (see `_decode`)."""
        return _span(len(request.input_ids) + self.max_new_tokens)

    def _compact(self, rows: list[_Row | None]) -> None:
        """Move the last rows into the freed slots, so that the active rows hold slots 0…n−1."""
        k = 0
        while True:
            while rows and rows[-1] is None:
                rows.pop()
            if k >= len(rows):
                return
            if rows[k] is None:
                tail = rows.pop()
                self.cache.move(len(rows), k, tail.length, self._reach(tail.request))
                rows[k] = tail
            k += 1

    def _prefill(self, requests: list[Request], slots: list[int]) -> list[_Row]:
        """Run `requests`' prompts through the model as one sequence into `slots` (each attends to its own
        prompt only) and draw each its first token."""
        lengths = [len(r.input_ids) for r in requests]
        if not all(lengths):
            raise ValueError(f"empty prompt for request {next(r.key for r in requests if not r.input_ids)!r}")
        ends = list(accumulate(lengths))
        starts = [end - n for end, n in zip(ends, lengths, strict=True)]
        ids = torch.tensor([[t for r in requests for t in r.input_ids]], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        reach = [self._reach(r) for r in requests]

        def attend(i: int, layer: _Layer, q, k, v):
            outs = []
            for j, (a, b) in enumerate(zip(starts, ends, strict=True)):
                self.cache.write_prompt(i, slots[j], k[:, :, a:b], v[:, :, a:b], reach[j])
                outs.append(_sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], layer, causal=True))
            return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

        hidden = self._forward(ids, positions, attend)
        rows = [_Row(r, torch.Generator().manual_seed(r.seed), length=n) for r, n in zip(requests, lengths,
                                                                                       strict=True)]
        last = hidden[0, [end - 1 for end in ends]]
        for row, token in zip(rows, self._sample(last, rows), strict=True):
            row.tokens.append(token)
        return rows

    def _decode(self, rows: list[_Row]) -> None:
        """One new token for every active row. Each row attends over its own span (its length rounded up to
        `SPAN`), never the batch's longest: attention sums over the padded span in an order that depends on
        its length, so a shared span would make a row's numbers depend on the others in the batch. Rows of
        one span are attended together (slots are filled longest prompt first, so they are mostly adjacent)."""
        n = len(rows)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        positions = torch.tensor([r.length for r in rows], device=self.device)
        slots = torch.arange(n, device=self.device)
        spans = [_span(r.length + 1) for r in rows]
        groups = []
        for span in sorted(set(spans)):
            members = [k for k, s in enumerate(spans) if s == span]
            contiguous = members == list(range(members[0], members[-1] + 1))
            rows_of = slice(members[0], members[-1] + 1) if contiguous else torch.tensor(members, device=self.device)
            visible = torch.arange(span, device=self.device)[None] <= positions[rows_of][:, None]
            groups.append((rows_of, span, visible[:, None, None, :]))

        def attend(i: int, layer: _Layer, q, k, v):
            self.cache.write_step(i, slots, positions, k, v)
            keys, values = self.cache.k[i], self.cache.v[i]
            if len(groups) == 1:
                _, span, mask = groups[0]
                return _sdpa(q, keys[:n, :, :span], values[:n, :, :span], layer, mask=mask,
                             row_invariant=self.row_invariant_attention)
            out = q.new_empty(n, 1, layer.heads * layer.head_dim)
            for rows_of, span, mask in groups:
                k_g, v_g = keys[:, :, :span], values[:, :, :span]
                if isinstance(rows_of, slice):
                    k_g, v_g = k_g[rows_of], v_g[rows_of]
                else:
                    k_g, v_g = k_g.index_select(0, rows_of), v_g.index_select(0, rows_of)
                out[rows_of] = _sdpa(q[rows_of], k_g, v_g, layer, mask=mask, row_invariant=self.row_invariant_attention)
            return out

        hidden = self._forward(ids, positions[:, None], attend)
        for row, token in zip(rows, self._sample(hidden[:, -1], rows), strict=True):
            row.tokens.append(token)
            row.length += 1

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """Final hidden states for `ids` at `positions`: the Llama decoder layer's maths, step for step as
        transformers computes it (so float32 greedy decoding gives `model.generate`'s tokens).
        `attend(layer_index, layer, q, k, v)` stores the new keys/values and returns the attention output."""
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        cos, sin = (t.unsqueeze(2) for t in inner.rotary_emb(hidden, position_ids=positions))
        for i, layer in enumerate(self.layers):
            x = self._cast(layer.module.input_layernorm(hidden))
            qkv = layer.qkv.whole(x)
            # queries and keys rotated in one pass (elementwise: each value is what rotating them apart gives)
            width = (layer.heads + layer.kv_heads) * layer.head_dim
            qk = qkv[..., :width].unflatten(-1, (-1, layer.head_dim))
            qk = self._cast(qk * cos + _rotate_half(qk) * sin).transpose(1, 2)
            q, k = qk[:, : layer.heads], qk[:, layer.heads:]
            v = qkv[..., width:].unflatten(-1, (-1, layer.head_dim)).transpose(1, 2)
            hidden = hidden + layer.o(attend(i, layer, q, k, v))[0]
            x = self._cast(layer.module.post_attention_layernorm(hidden))
            gate, up = layer.gate_up(x)
            hidden = hidden + layer.down(self._silu(gate) * up)[0]
        return inner.norm(hidden)

    def _silu(self, gate: torch.Tensor) -> torch.Tensor:
        """SiLU; in bf16 in pieces of whole rows of at most `GRAIN` elements, each row computed as it would be
        alone. Prompts prefilled together make one long tensor, which torch would split between threads at a
        point set by the prompts' total length, rounding the rows there by the others in the batch. (A float32
        prompt is prefilled alone: where it is split depends on it only.)"""
        width = gate.shape[-1]
        rows = gate.reshape(-1, width)
        if self.compute_dtype is None or rows.numel() <= GRAIN:
            return torch.nn.functional.silu(gate)
        pieces = [torch.nn.functional.silu(piece) for piece in rows.split(max(1, GRAIN // width))]
        return torch.cat(pieces).view(gate.shape)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    def _logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 logits, and in bf16 each row's top `NUCLEUS_CANDIDATES` ids. In bf16 the output layer runs
        in bf16 (its logits are rounded to bf16) and those candidates, where argmax and nucleus are decided,
        are recomputed exactly from the float32 weights."""
        if self.compute_dtype is None:
            return self.head.whole(hidden[:, None])[:, 0].float(), None
        approx = self.head(hidden[:, None].to(self.compute_dtype))[0][:, 0].float()
        top = approx.topk(NUCLEUS_CANDIDATES, dim=-1).indices
        lm = self.model.lm_head
        exact = torch.einsum("nh,nkh->nk", hidden, lm.weight[top])
        if lm.bias is not None:
            exact = exact + lm.bias[top]
        return approx.scatter_(-1, top, exact), top

    def _sample(self, hidden: torch.Tensor, rows: list[_Row]) -> list[int]:
        logits, top = self._logits(hidden)
        if self.temperature == 0:
            return logits.argmax(-1).tolist()
        u = torch.cat([torch.rand(1, generator=r.generator) for r in rows]).to(logits.device)
        return sample_top_p(logits / self.temperature, self.top_p, u, candidates=top,
                            wide_candidates=None if top is None else WIDE_CANDIDATES).tolist()


def sample_top_p(logits: torch.Tensor, top_p: float, u: torch.Tensor, candidates: torch.Tensor | None = None,
                 wide_candidates: int | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(`logits`) restricted to its top-p nucleus, by inverse CDF at the
    uniform `u` (one per row). The nucleus is the most probable tokens whose mass before each is < top_p
    (as in transformers' top-p warper); it is looked for among each row's top `NUCLEUS_CANDIDATES` (or its
    `candidates` ids, found by the caller), then among its top `wide_candidates`, and only rows whose nucleus
    reaches past those sort the whole vocabulary."""
    if top_p >= 1.0:
        return _inverse_cdf(torch.softmax(logits, -1), u, None)
    if candidates is None:
        values, ids = logits.topk(min(NUCLEUS_CANDIDATES, logits.shape[-1]), dim=-1)
    else:
        values, order = logits.gather(-1, candidates).sort(-1, descending=True)
        ids = candidates.gather(-1, order)
    log_total = torch.logsumexp(logits, -1, keepdim=True)
    probs = torch.exp(values - log_total)
    out = _inverse_cdf(_nucleus(probs, top_p), u, ids)
    wide = (probs.sum(-1) < top_p).nonzero().flatten()
    if len(wide) and wide_candidates:
        values, ids = logits[wide].topk(min(wide_candidates, logits.shape[-1]), dim=-1)
        probs = torch.exp(values - log_total[wide])
        out[wide] = _inverse_cdf(_nucleus(probs, top_p), u[wide], ids)
        wide = wide[probs.sum(-1) < top_p]
    if len(wide):  # nucleus larger than the candidates: full sort for these rows
        values, ids = logits[wide].sort(-1, descending=True)
        probs = torch.softmax(values, -1)
        out[wide] = _inverse_cdf(_nucleus(probs, top_p), u[wide], ids)
    return out


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    before = sorted_probs.cumsum(-1) - sorted_probs
    return torch.where(before < top_p, sorted_probs, 0.0)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=probs.shape[-1] - 1)
    return (ids.gather(-1, pick) if ids is not None else pick).squeeze(-1)
