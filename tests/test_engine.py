"""The continuous-batching engine against `model.generate`: the same greedy tokens on the real SmolLM2 and on
non-uniform prunes, per-prompt sampling that no batch size changes, the nucleus sampler by hand, and the
`model.generate` fallback for other architectures."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import pytest
import torch

from dadpo.data import PromptRecord, chat_prompt
from dadpo.distributed import interleave, shard
from dadpo.engine import (
    NUCLEUS_CANDIDATES,
    ROW_BLOCK,
    WIDE_CANDIDATES,
    Engine,
    Request,
    _Layer,
    _Linear,
    _sdpa,
    bf16_units,
    request_seed,
    sample_top_p,
    unsupported,
)
from dadpo.generation import GenerationConfig, answer_records, generate_batch
from dadpo.models import chat_end_token_ids

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain photosynthesis in one sentence.", "What is 12 times 12?", "Give me a synonym for happy.",
             "Who wrote Hamlet?", "List two uses of copper."]


def _rec(i, *turns):
    return PromptRecord(str(i), [{"role": "user", "content": t} for t in turns])


def _reference(model, tok, questions, new_tokens):
    """`model.generate`, one prompt at a time (no padding): the ids the engine must reproduce."""
    cfg = GenerationConfig(max_new_tokens=new_tokens)
    end = chat_end_token_ids(tok)
    out = []
    for q in questions:
        enc = tok(chat_prompt(tok, [{"role": "user", "content": q}]), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, top_k=None, top_p=None,
                                 temperature=None, eos_token_id=end, pad_token_id=tok.pad_token_id)
        row = ids[0, enc["input_ids"].shape[1]:].tolist()
        out.append(row[: next((k for k, t in enumerate(row) if t in end), len(row))])
    return out


def _engine(model, tok, questions, new_tokens, slots, **settings):
    engine = Engine(model, chat_end_token_ids(tok), slots=slots, max_new_tokens=new_tokens, **settings)
    ids = [tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
           for q in questions]
    results = {r.key: r.tokens for r in engine.stream(deque(Request(i, x, request_seed(0, i))
                                                            for i, x in enumerate(ids)))}
    return [results[i] for i in range(len(questions))]


def test_greedy_tokens_equal_model_generate_on_smollm(smollm):
    """Three slots for eight prompts: slots are refilled as answers end and the tail is compacted."""
    model, tok = smollm
    assert unsupported(model) is None
    assert _engine(model, tok, QUESTIONS, 40, slots=3) == _reference(model, tok, QUESTIONS, 40)


def _bf16_units_or_skip(model, precision: str) -> None:
    if precision == "bfloat16" and not bf16_units(model):
        pytest.skip("bf16 is batch-invariant on CPUs with bf16 instructions (AMX, AVX-512 BF16), the ones "
                    "`precision: auto` samples in bf16 on")


@pytest.mark.parametrize("precision", ["model", "bfloat16"])
def test_sampled_answers_do_not_depend_on_the_batch_or_the_shard(smollm, precision):
    """bf16 rounding turns any difference of summation order into a different sample, so this holds only
    because every row's numbers are computed the same way whatever else is in the batch (in bf16, products
    of more than 32 rows round some rows differently, hence a batch of 48 there; float32, measured invariant
    at 80 rows, keeps 32 prompts to save time)."""
    model, tok = smollm
    _bf16_units_or_skip(model, precision)
    n = 48 if precision == "bfloat16" else 32
    recs = [_rec(i, f"Tell me one fact about the number {i}.") for i in range(n)]
    cfg = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, precision=precision)
    runs = [[r["response"] for r in answer_records(model, tok, recs, GenerationConfig(**cfg, batch_size=bs))]
            for bs in (8, 3, n)]
    assert runs[0] == runs[1] == runs[2]
    alone = answer_records(model, tok, recs[:6], GenerationConfig(**cfg, batch_size=1))
    assert [r["response"] for r in alone] == runs[0][:6]
    shards = [[r["response"] for r in answer_records(model, tok, shard(recs, rank, 2),
                                                     GenerationConfig(**cfg, batch_size=32))] for rank in (0, 1)]
    assert interleave(shards) == runs[0]  # two processes, each its share of the prompts
    other = [r["response"] for r in answer_records(model, tok, recs, GenerationConfig(**{**cfg, "seed": 4},
                                                                                      batch_size=8))]
    assert sum(a != b for a, b in zip(runs[0], other, strict=True)) >= 3 * n // 4  # another seed, other answers
    shuffled = answer_records(model, tok, recs[::-1][:5], GenerationConfig(**cfg, batch_size=2))
    assert [r["response"] for r in shuffled] == runs[0][::-1][:5]  # nor on which prompts come with it


@pytest.mark.parametrize("precision", ["model", "bfloat16"])
def test_a_sampled_rows_logits_are_bit_identical_alone_and_in_any_batch(smollm, precision, monkeypatch):
    """The guarantee under the test above, where a difference cannot hide: every logit a request gets at every
    step is bit-identical at 1, 3 and 7 slots. A row's different last bit changes its sample only rarely,
    so equal answers over a few prompts prove little: MKL's float32 products round a row differently at
    different row counts on some CPUs (AMD EPYC), which changed 1 of 64 sampled answers of 48 tokens."""
    model, tok = smollm
    _bf16_units_or_skip(model, precision)
    seen: dict[int, dict[int, list[torch.Tensor]]] = {}
    sample = Engine._sample

    def recording(self, hidden, rows):  # the logits `_sample` decides by, per request and step
        for row, logits in zip(rows, self._logits(hidden)[0], strict=True):
            seen[self.slots].setdefault(row.request.seed, []).append(logits)
        return sample(self, hidden, rows)

    monkeypatch.setattr(Engine, "_sample", recording)
    # one prompt of ~250 tokens among short ones: its row attends over a longer span than the others, so at 3
    # and 7 slots the rows of one span are not adjacent (the gathered-group path of `Engine._decode`)
    passage = " ".join(f"Box {i} holds {i * 7 % 13} apples." for i in range(24))
    questions = [*QUESTIONS[:3], f"{passage} Which box holds the most apples?", *QUESTIONS[3:6]]
    recs = [_rec(i, q) for i, q in enumerate(questions)]
    for slots in (1, 3, 7):
        seen[slots] = {}
        answer_records(model, tok, recs, GenerationConfig(max_new_tokens=12, temperature=1.0, seed=5,
                                                          batch_size=slots, precision=precision))
    assert len(seen[1]) == 7
    for slots in (3, 7):
        assert seen[slots].keys() == seen[1].keys()
        for seed, steps in seen[1].items():
            assert len(seen[slots][seed]) == len(steps)
            assert all(torch.equal(a, b) for a, b in zip(steps, seen[slots][seed], strict=True)), (slots, seed)


def test_row_invariant_decode_attention_sums_bf16_scores_in_float32():
    """The written-out decode attention with float32 keys (the engine's bf16 cache) gives torch's bf16 flash
    attention's result to bf16 rounding, and is far closer to float32 attention than bf16 keys make it."""
    torch.manual_seed(0)
    layer = _Layer(None, None, None, None, None, heads=6, kv_heads=2, head_dim=32, scaling=32**-0.5)
    q, k, v = torch.randn(5, 6, 1, 32) * 3, torch.randn(5, 2, 64, 32) * 3, torch.randn(5, 2, 64, 32)
    mask = (torch.arange(64)[None] <= torch.tensor([3, 17, 40, 63, 0])[:, None])[:, None, None, :]
    bf = {name: t.bfloat16() for name, t in (("q", q), ("k", k), ("v", v))}
    exact = _sdpa(bf["q"].float(), bf["k"].float(), bf["v"].float(), layer, mask=mask, row_invariant=True)
    flash = _sdpa(bf["q"], bf["k"], bf["v"], layer, mask=mask).float()
    written = _sdpa(bf["q"], bf["k"].float(), bf["v"], layer, mask=mask, row_invariant=True)
    coarse = _sdpa(bf["q"], bf["k"], bf["v"], layer, mask=mask, row_invariant=True).float()
    assert written.dtype == torch.bfloat16 and written.shape == (5, 1, 6 * 32)
    written = written.float()
    assert torch.allclose(written, flash, atol=2e-2)
    assert (written - exact).abs().mean() < 0.5 * (coarse - exact).abs().mean()


def _pruned_tiny(tok_dir: Path, seed: int = 0):
    """A random 3-layer non-uniform prune (per-layer MLP widths, query and key/value heads), as dadpo saves."""
    import dadpo.modeling_dadpo_pruned  # noqa: F401  (registers the pruned classes)
    from dadpo.modeling_dadpo_pruned import PRUNED_CLASSES

    config_cls, model_cls = PRUNED_CLASSES["llama"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    torch.manual_seed(seed)
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                        layer_intermediate_sizes=[128, 40, 72], layer_num_attention_heads=[4, 2, 4],
                        layer_num_key_value_heads=[2, 1, 2], eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = model_cls(config).eval()
    for p in model.parameters():  # larger weights than init: confident, non-degenerate random text
        p.data.normal_(0, 0.2)
    return model, tok


def test_non_uniform_prune_greedy_and_a_growing_cache(smollm_dir):
    model, tok = _pruned_tiny(smollm_dir)
    assert [lay.mlp.gate_proj.out_features for lay in model.model.layers] == [128, 40, 72]
    assert unsupported(model) is None
    assert _engine(model, tok, QUESTIONS, 24, slots=2) == _reference(model, tok, QUESTIONS, 24)
    # a follow-up request longer than the cache holds: the slots grow, the running row keeps its keys
    end = chat_end_token_ids(tok)
    engine = Engine(model, end, slots=2, max_new_tokens=24)
    short = tok(chat_prompt(tok, [{"role": "user", "content": "Hi"}]), add_special_tokens=False)["input_ids"]
    long_q = " ".join(QUESTIONS * 8)
    long_ids = tok(chat_prompt(tok, [{"role": "user", "content": long_q}]), add_special_tokens=False)["input_ids"]
    queue = deque([Request("a", short), Request("b", short + short)])
    got = {}
    for r in engine.stream(queue):
        got[r.key] = r.tokens
        if r.key == "a":
            queue.append(Request("long", long_ids))
    assert len(long_ids) + 24 > 256 and engine.cache.capacity >= len(long_ids) + 24
    assert got["long"] == _reference(model, tok, [long_q], 24)[0]
    assert got["a"] == _reference(model, tok, ["Hi"], 24)[0]


@pytest.mark.parametrize("temperature, bf16", [(0.0, False), (1.0, False), (1.0, True)])
def test_cache_memory_nothing_wrote_is_never_read(smollm_dir, monkeypatch, temperature, bf16):
    """The cache is allocated, not zeroed. Filled with NaN instead of zeros, it gives the same answers: slots
    refilled, rows compacted into other slots and a cache that grows for a longer prompt never read a
    position their row did not write or clear (a NaN there would reach the logits)."""
    from dadpo.engine import _SlotCache

    model, tok = _pruned_tiny(smollm_dir)
    ids = [tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
           for q in [*QUESTIONS, " ".join(QUESTIONS * 8)]]
    assert len(ids[-1]) + 16 > 256  # the last prompt makes the cache grow
    moves, move = [], _SlotCache.move
    monkeypatch.setattr(_SlotCache, "move", lambda self, *a: moves.append(a) or move(self, *a))

    def answers(fill: float, end: list[int]):
        monkeypatch.setattr(_SlotCache, "_buffer", staticmethod(
            lambda like, shape, dtype=None: like.new_full(shape, fill, dtype=dtype)))
        engine = Engine(model, end, slots=3, max_new_tokens=16, temperature=temperature, bf16=bf16)
        out = {r.key: (r.tokens, r.stopped) for r in engine.stream(
            deque(Request(i, x, request_seed(0, i)) for i, x in enumerate(ids)))}
        assert engine.cache.capacity > 256
        return out

    # the random model has no end of turn: these tokens, from its own answers, end rows at different steps, so
    # rows leave mid-batch, the next prompts take their slots and the rest are compacted
    free = answers(0.0, [])
    end = [free[0][0][3], free[4][0][9]]
    zeroed = answers(0.0, end)
    # the long row is compacted into a slot whose earlier short row cleared only up to its own reach
    assert len({len(tokens) for tokens, _ in zeroed.values()}) > 1 and any(reach > 256 for *_, reach in moves)
    assert answers(math.nan, end) == zeroed


@pytest.mark.parametrize("bf16", [False, True])
def test_free_slots_are_prefilled_together_in_bf16_up_to_prefill_tokens(smollm_dir, monkeypatch, bf16):
    """bf16 admits queued prompts into all free slots in passes of at most `PREFILL_TOKENS` prompt tokens;
    float32 one prompt a pass. Every request is answered either way."""
    import dadpo.engine as engine_module

    model, tok = _pruned_tiny(smollm_dir)
    ids = [tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
           for q in QUESTIONS]
    cap = 2 * max(len(x) for x in ids)
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", cap)
    passes, prefill = [], Engine._prefill

    def recording(self, requests, slots):
        passes.append(([len(r.input_ids) for r in requests], list(slots)))
        return prefill(self, requests, slots)

    monkeypatch.setattr(Engine, "_prefill", recording)
    engine = Engine(model, chat_end_token_ids(tok), slots=5, max_new_tokens=6, temperature=1.0, bf16=bf16)
    results = list(engine.stream(deque(Request(i, x, i) for i, x in enumerate(ids))))
    assert sorted(r.key for r in results) == list(range(len(ids)))
    assert sum(len(lengths) for lengths, _ in passes) == len(ids)
    for lengths, slots in passes:
        assert len(set(slots)) == len(slots) and all(0 <= k < 5 for k in slots)
        assert len(lengths) == 1 or (bf16 and sum(lengths) <= cap)
    assert (max(len(lengths) for lengths, _ in passes) >= 2) == bf16  # the cap holds two prompts or more


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_a_prepacked_product_takes_at_most_its_block_of_rows_and_a_float32_prompt_whole(monkeypatch):
    """Requests (a decode step's rows) go in blocks of `ROW_BLOCK`. A bf16 prompt's tokens go in blocks of
    `prompt_block`: `WIDE_ROW_BLOCK` on AVX-512 BF16 without AMX, else `ROW_BLOCK` (prompts are prefilled
    together). A float32 prompt stays one product, whatever its length."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, 24), torch.nn.Linear(16, 8, bias=False)]
    fused, fp32 = _Linear(layers, torch.bfloat16, True), _Linear(layers, None, True)
    assert fused.packed is not None and fp32.packed is not None
    wide = torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported()
    calls, product = [], _Linear._packed_product

    def counted(self, x):
        calls.append(x.reshape(-1, x.shape[-1]).shape[0])  # rows in this product
        return product(self, x)

    monkeypatch.setattr(_Linear, "_packed_product", counted)
    x = torch.randn(ROW_BLOCK + 8, 1, 16, dtype=torch.bfloat16)
    gate, up = fused(x)
    assert calls == [ROW_BLOCK, 8]
    weight = torch.cat([m.weight for m in layers]).bfloat16()
    bias = torch.cat([layers[0].bias, torch.zeros(8)]).bfloat16()
    expected = torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(torch.cat([gate, up], -1), expected, atol=0.05, rtol=0.02)
    calls.clear()
    prompt = fused.whole(x.view(1, ROW_BLOCK + 8, 16))
    assert calls == ([ROW_BLOCK + 8] if wide else [ROW_BLOCK, 8]) and prompt.shape == (1, ROW_BLOCK + 8, 32)
    assert torch.equal(prompt[0], fused.whole(x)[:, 0])  # a prompt's token rows come back in their order
    calls.clear()
    fused.prompt_block = ROW_BLOCK  # the splitting of a prompt, wherever the test runs
    assert torch.equal(fused.whole(x.view(1, ROW_BLOCK + 8, 16)), prompt) and calls == [ROW_BLOCK, 8]
    calls.clear()
    fp32.whole(x.view(1, ROW_BLOCK + 8, 16).float())
    assert calls == [ROW_BLOCK + 8]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")
def test_bf16_products_compute_a_row_the_same_in_a_block_as_in_32_row_calls(smollm):
    """What `_Linear.prompt_block` rests on, checked on this CPU with SmolLM2's own weights: a bf16 product of
    up to `prompt_block` token rows gives every row as calls of `ROW_BLOCK` rows do (AMX rounds rows past 32
    differently, so there, as on CPUs without bf16 units, the block is 32 and this holds trivially)."""
    model, _ = smollm
    torch.manual_seed(0)
    for i in (0, 29):
        layer = _Layer.of(model.model.layers[i], torch.bfloat16, True)
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            x = (torch.randn(1, 1500, linear.packed.shape[1]) * 0.3).bfloat16()
            blocks = torch.cat([linear._packed_product(part) for part in x[0].split(ROW_BLOCK)])
            assert torch.equal(linear.whole(x)[0], blocks), (i, linear.sizes)


def test_precision_auto_is_bf16_only_for_sampling_on_bf16_units(smollm, tmp_path):
    from dadpo.engine import resolve_precision
    from dadpo.generation import generate_to_file

    model, _ = smollm
    units = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert bf16_units(model) == units
    assert resolve_precision("auto", model, 0.7) == ("bfloat16" if units else "model")
    assert resolve_precision("auto", model, 0.0) == "model" and resolve_precision("model", model, 0.7) == "model"
    rows = generate_to_file(model, smollm[1], [_rec(0, "Hi")], GenerationConfig(max_new_tokens=2, temperature=0.7),
                            tmp_path / "a.jsonl", model_name="m", progress=False)
    assert rows[0]["generation"]["precision"] == resolve_precision("auto", model, 0.7)  # stamped as resolved


@pytest.mark.parametrize("given, wide", [(False, None), (True, 2 * NUCLEUS_CANDIDATES), (True, 4 * NUCLEUS_CANDIDATES)])
def test_sample_top_p_draws_exactly_the_nucleus_distribution(given, wide):
    """Inverse CDF on a fine grid of u gives each nucleus token a share equal to its renormalised probability
    and never a token outside the nucleus; also when the nucleus is wider than the first candidates (found
    here or `given` in any order, as bf16's output layer does), then found among the `wide` ones or by the
    full sort (its ~205 tokens are past 128 and within 256)."""
    for vocab, scale in ((50, 3.0), (4 * NUCLEUS_CANDIDATES, 0.01)):
        torch.manual_seed(0)
        logits = torch.randn(vocab) * scale
        probs = torch.softmax(logits, -1)
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        nucleus = order[before < 0.8]
        if vocab > 50:
            assert 2 * NUCLEUS_CANDIDATES < len(nucleus) <= 4 * NUCLEUS_CANDIDATES
        grid = 20000
        u = (torch.arange(grid) + 0.5) / grid
        top = order[: min(NUCLEUS_CANDIDATES, vocab)][torch.randperm(min(NUCLEUS_CANDIDATES, vocab))]
        tokens = sample_top_p(logits.expand(grid, vocab).contiguous(), 0.8, u,
                              top.expand(grid, -1) if given else None, wide)
        counts = torch.bincount(tokens, minlength=vocab).double() / grid
        expected = torch.zeros(vocab, dtype=torch.double)
        expected[nucleus] = probs[nucleus].double() / probs[nucleus].sum()
        assert set(tokens.unique().tolist()) <= set(nucleus.tolist())
        assert torch.allclose(counts, expected, atol=2 / grid + 1e-6)
    full = sample_top_p(torch.tensor([[0.0, 0.0, 0.0, 0.0]]).expand(4, 4), 1.0, torch.tensor([0.1, 0.3, 0.6, 0.9]))
    assert full.tolist() == [0, 1, 2, 3]


def test_sample_top_p_rows_of_every_kind_in_one_call_draw_as_alone():
    """Rows whose nucleus fits the first candidates, the wide tier or only the full sort, mixed in one call:
    each draws what it draws alone (the tiers' row bookkeeping), always inside its nucleus."""
    torch.manual_seed(1)
    vocab = 4 * WIDE_CANDIDATES
    scales = [4.0, 0.02, 4.0, 0.0, 2.5, 0.02, 0.0, 3.0]  # sharp, flat (full sort), uniform, in between
    logits = torch.stack([torch.randn(vocab) * s for s in scales])
    u = torch.rand(len(scales))
    candidates = logits.topk(NUCLEUS_CANDIDATES, -1).indices.flip(-1)  # given in another order
    together = sample_top_p(logits, 0.9, u, candidates, WIDE_CANDIDATES)
    alone = [sample_top_p(logits[i:i + 1], 0.9, u[i:i + 1], candidates[i:i + 1], WIDE_CANDIDATES).item()
             for i in range(len(scales))]
    assert together.tolist() == alone
    probs = torch.softmax(logits, -1)
    sizes = []
    for row, token in zip(probs, alone, strict=True):
        ordered = row.sort(descending=True).values
        size = int(((ordered.cumsum(0) - ordered) < 0.9).sum())
        sizes.append(size)
        assert row[token] >= ordered[size - 1]  # inside the nucleus
    assert min(sizes) <= NUCLEUS_CANDIDATES < sizes[4] <= WIDE_CANDIDATES < max(sizes)  # every path taken


def test_bf16_silu_computes_each_row_as_alone_however_many_rows_come_with_it():
    """Prompts prefilled together make one long activation tensor, which torch splits between threads where
    the prompts' total length says, with a scalar loop there: `Engine._silu` keeps every row as it is
    alone. Float32 values here, where a scalar and a vectorized exp differ more often than in bf16."""
    torch.manual_seed(0)
    engine = Engine.__new__(Engine)
    engine.compute_dtype = torch.bfloat16
    for tokens in (37, 53, 71, 99):
        gate_up = torch.randn(1, tokens, 2 * 936) * 4  # the 20% prune's MLP width; gate is a strided view
        gate = gate_up[..., :936]
        together = engine._silu(gate)
        alone = torch.cat([torch.nn.functional.silu(gate[:, t:t + 1]) for t in range(tokens)], 1)
        assert torch.equal(together, alone), tokens


@pytest.mark.parametrize("precision", ["model", "bfloat16"])
def test_one_token_answers_free_and_refill_slots_in_the_same_step(smollm, precision):
    """max_new_tokens=1: every admitted row is finished at once, so slots are freed and refilled (several
    prompts at a time in bf16) before any decode step; every request still gets its one token, as alone."""
    model, tok = smollm
    _bf16_units_or_skip(model, precision)
    ids = [tok(chat_prompt(tok, [{"role": "user", "content": q}]), add_special_tokens=False)["input_ids"]
           for q in QUESTIONS]
    got = {}
    for slots in (1, 3, 8):
        engine = Engine(model, chat_end_token_ids(tok), slots=slots, max_new_tokens=1, temperature=1.0,
                        bf16=precision == "bfloat16")
        results = list(engine.stream(deque(Request(i, x, request_seed(0, i)) for i, x in enumerate(ids))))
        got[slots] = {r.key: (r.tokens, r.stopped) for r in results}
        assert sorted(got[slots]) == list(range(len(ids)))
    assert got[1] == got[3] == got[8]


def test_other_architectures_use_model_generate_with_per_prompt_seeds(smollm_dir):
    """A GPT-2 is not a Llama-family model: `model.generate` answers, batch sizes still do not matter."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    assert "gpt2" in unsupported(model)
    recs = [_rec(i, q) for i, q in enumerate(QUESTIONS[:5])]
    greedy = answer_records(model, tok, recs, GenerationConfig(max_new_tokens=8, batch_size=5))
    assert [r["response"] for r in greedy] == [generate_batch(model, tok, [r.messages], GenerationConfig(
        max_new_tokens=8))[0][0] for r in recs]
    cfg = dict(max_new_tokens=8, temperature=1.0, seed=5)
    a = answer_records(model, tok, recs, GenerationConfig(**cfg, batch_size=1))
    b = answer_records(model, tok, recs, GenerationConfig(**cfg, batch_size=5))
    assert [r["response"] for r in a] == [r["response"] for r in b]


@pytest.mark.parametrize("turns", [1, 2])
def test_engine_rows_carry_turns_tokens_and_finish_reason(smollm, turns):
    model, tok = smollm
    rec = _rec(0, *["Say hello.", "Now say goodbye."][:turns])
    row = answer_records(model, tok, [rec], GenerationConfig(max_new_tokens=3, batch_size=4))[0]
    assert len(row["responses"]) == turns and row["new_tokens"] == 3 * turns
    assert row["finish_reason"] == "length"
