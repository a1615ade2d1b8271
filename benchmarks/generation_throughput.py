"""Generation throughput: dadpo's continuous-batching engine vs `model.generate`, side by side in one process.

Usage:
    python benchmarks/generation_throughput.py --models smollm2-135m-instruct,runs/p20 \\
        [--sets train,heldout] [--modes sample,greedy] [--batch-size 32] [--max-new-tokens 128] [--json OUT]

Sets: `train` = the first 32 Dolly training prompts (after the 80 held-out rows) without a context passage,
`heldout` = the first 32 held-out rows (many carry a long context passage). Modes: `sample` = recover's
settings (temperature 0.7, top-p 0.95), `greedy`. Both paths produce exactly `--max-new-tokens` tokens per
prompt (end-of-turn tokens do not stop a row), so they do the same work. Impls: `hf` = the project's former
path (`generate_batch` → `model.generate`, one left-padded batch per 32 prompts), `engine` = the new path at
its default precision (bf16 matmuls when sampling on a CPU with AMX or AVX-512 BF16, else fp32), `engine_fp32`,
`engine_bf16`. Effective GFLOP/s = 2 · parameters · tokens / seconds, next to this machine's matmul peak
measured in the same run. `--check-greedy` also compares greedy token ids (stopping at end of turn, as in
use) of the engine with `model.generate` one prompt at a time and on the whole left-padded batch, the bf16
engine's greedy ids with them, and the per-token NLL of the fp32 greedy answers under fp32 vs bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import deque

import torch

from dadpo.data import chat_prompt, load_prompts
from dadpo.engine import Engine, Request, _sdpa, request_seed, resolve_precision
from dadpo.generation import GenerationConfig, generate_batch
from dadpo.io import atomic_write_json
from dadpo.models import chat_end_token_ids, load_model

SAMPLE = {"temperature": 0.7, "top_p": 0.95}
GREEDY = {"temperature": 0.0, "top_p": 1.0}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def prompt_sets(data: str, names: list[str]) -> dict[str, list]:
    rows = load_prompts(f"{data}/dolly15k/databricks-dolly-15k.jsonl")
    no_context = [r for r in rows[80:] if "\n\n" not in r.messages[0]["content"]]
    sets = {"train": no_context[:32], "heldout": rows[:32]}
    return {n: [r.messages for r in sets[n]] for n in names}


def run_hf(model, tok, convs, settings, bs, new_tokens) -> tuple[int, float]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, batch_size=bs, **settings)
    orig = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = new_tokens  # equal work: no early stops
    torch.manual_seed(0)
    t = time.perf_counter()
    n = 0
    for start in range(0, len(convs), bs):
        n += sum(k for _, k, _ in generate_batch(model, tok, convs[start:start + bs], cfg))
    model.generation_config.min_new_tokens = orig
    return n, time.perf_counter() - t


def engine_ids(model, tok, convs, settings, bs, new_tokens, end_ids, precision="auto"
               ) -> tuple[dict[int, list[int]], float]:
    t = time.perf_counter()
    bf16 = resolve_precision(precision, model, settings["temperature"]) == "bfloat16"
    engine = Engine(model, end_ids, slots=bs, max_new_tokens=new_tokens, bf16=bf16, **settings)
    ids = [tok(chat_prompt(tok, c), add_special_tokens=False)["input_ids"] for c in convs]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first, as generate_to_file does
    out = {r.key: r.tokens for r in engine.stream(deque(Request(i, ids[i], request_seed(0, i)) for i in order))}
    return out, time.perf_counter() - t


def hf_greedy_ids(model, tok, convs, new_tokens, end_ids, bs) -> dict[int, list[int]]:
    out = {}
    for start in range(0, len(convs), bs):
        enc = tok([chat_prompt(tok, c) for c in convs[start:start + bs]], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, top_k=None, top_p=None,
                                 temperature=None, eos_token_id=end_ids, pad_token_id=tok.pad_token_id)
        for k, row in enumerate(gen[:, enc["input_ids"].shape[1]:].tolist()):
            stop = next((j for j, t in enumerate(row) if t in end_ids), len(row))
            out[start + k] = row[:stop]
    return out


def response_nll(model, tok, convs, answers: dict[int, list[int]], bf16: bool) -> float:
    """Per-token NLL of `answers` (the fp32 greedy ones) under the engine's forward in fp32 or bf16: how far
    bf16 arithmetic moves the model's distribution."""
    engine = Engine(model, [], slots=1, max_new_tokens=1, bf16=bf16)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, conv in enumerate(convs):
            prompt = tok(chat_prompt(tok, conv), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answers[i]])
            if not answers[i]:
                continue
            hidden = engine._forward(ids, torch.arange(ids.shape[1])[None],
                                     lambda _, layer, q, k, v: _sdpa(q, k, v, layer, causal=True))
            logp = torch.log_softmax(model.lm_head(hidden[0, len(prompt) - 1:-1]).float(), -1)
            total -= logp.gather(-1, torch.tensor(answers[i])[:, None]).sum().item()
            count += len(answers[i])
    return round(total / count, 5)


def agreement(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict:
    same = [k for k in a if a[k] == b[k]]
    tokens = sum(len(v) for v in b.values())
    first = {k: next((j for j, (x, y) in enumerate(zip(a[k], b[k], strict=False)) if x != y), min(len(a[k]), len(b[k])))
             for k in a if a[k] != b[k]}
    return {"prompts_identical": len(same), "prompts": len(a), "reference_tokens": tokens,
            "first_divergence": first}


def write_report(report: dict, path: str | None) -> None:
    """Print `report` as JSON with this machine and torch version first, and write it to `path` when given
    (atomically: a killed run leaves no half-written file)."""
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, **report}
    if path:
        atomic_write_json(path, report)
    print(json.dumps(report))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct", help="comma-separated model specs")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--sets", default="train,heldout")
    ap.add_argument("--modes", default="sample,greedy")
    ap.add_argument("--impls", default="hf,engine,engine_fp32",
                    help="hf (model.generate), engine (default precision), engine_fp32, engine_bf16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--check-greedy", action="store_true", help="compare greedy token ids with model.generate")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    peak = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak (2048^3, {torch.get_num_threads()} threads): fp32 {peak['float32']:.0f} GFLOP/s, "
          f"bf16 {peak['bfloat16']:.0f} GFLOP/s")
    sets = prompt_sets(args.data, args.sets.split(","))
    results = []
    for spec in args.models.split(","):
        model, tok = load_model(spec, dtype=args.dtype)
        n_params = sum(p.numel() for p in model.parameters())
        end_ids = chat_end_token_ids(tok)
        engine_ids(model, tok, sets[next(iter(sets))][:2], GREEDY, 2, 4, [])  # warm-up
        for set_name, convs in sets.items():
            for mode in args.modes.split(","):
                settings = SAMPLE if mode == "sample" else GREEDY
                row = {"model": spec, "params": n_params, "set": set_name, "mode": mode, "dtype": args.dtype}
                for impl in args.impls.split(","):
                    if impl == "hf":
                        n, dt = run_hf(model, tok, convs, settings, args.batch_size, args.max_new_tokens)
                    else:
                        precision = {"engine": "auto", "engine_fp32": "model", "engine_bf16": "bfloat16"}[impl]
                        out, dt = engine_ids(model, tok, convs, settings, args.batch_size, args.max_new_tokens, [],
                                             precision)
                        n = sum(len(v) for v in out.values())
                        row[f"{impl}_precision"] = resolve_precision(precision, model, settings["temperature"])
                    row[impl] = {"tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1),
                                 "gflop_per_s": round(2 * n_params * n / dt / 1e9, 1)}
                    print(f"{spec} {set_name} {mode} {impl}: {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s, "
                          f"{row[impl]['gflop_per_s']} GFLOP/s", flush=True)
                for impl in ("engine", "engine_fp32", "engine_bf16"):
                    if "hf" in row and impl in row:
                        row[f"{impl}_speedup"] = round(row[impl]["tok_per_s"] / row["hf"]["tok_per_s"], 2)
                        print(f"  {impl} / model.generate: {row[f'{impl}_speedup']}x", flush=True)
                results.append(row)
            if args.check_greedy:
                eng, _ = engine_ids(model, tok, convs, GREEDY, args.batch_size, args.max_new_tokens, end_ids)
                single = hf_greedy_ids(model, tok, convs, args.max_new_tokens, end_ids, 1)
                batched = hf_greedy_ids(model, tok, convs, args.max_new_tokens, end_ids, args.batch_size)
                bf16, _ = engine_ids(model, tok, convs, GREEDY, args.batch_size, args.max_new_tokens, end_ids,
                                     "bfloat16")
                check = {"model": spec, "set": set_name, "check": "greedy",
                         "engine_vs_generate_bs1": agreement(eng, single),
                         "generate_bs32_vs_generate_bs1": agreement(batched, single),
                         "engine_bf16_vs_generate_bs1": agreement(bf16, single),
                         "nll_of_greedy_answers": {p: response_nll(model, tok, convs, single, p == "bfloat16")
                                                   for p in ("float32", "bfloat16")}}
                print(json.dumps(check), flush=True)
                results.append(check)
        del model
    write_report({"matmul_peak_gflops": {k: round(v) for k, v in peak.items()}, "batch_size": args.batch_size,
                  "max_new_tokens": args.max_new_tokens, "results": results}, args.json)


if __name__ == "__main__":
    main()
