"""Where a sampled decode step's time goes, and how much faster a model can get from its products alone.

Usage:
    python benchmarks/decode_step_budget.py --models smollm2-135m-instruct,runs/p20 [--runs 3] [--json OUT]

For each model, at recover's sampling settings in the engine's default precision (bf16 products on a CPU with
bf16 units), 32 slots, the 32 short prompts of `generation_throughput.py --sets train`:
- step: the engine's decode time per step, (run of 128 new tokens − run of 1 new token) / 127, so prefill
  and the first sample are left out;
- products: one decode step's prepacked products alone, every layer's four and the output layer at 32 rows,
  timed back to back outside the engine (median of `--reps`);
- rest: step − products: attention, sampling, norms, rotary, casts, cache writes.

The models load together and take turns run by run (in reverse order every other turn), their products
timed in each turn, so that this box's drift (5–15% between runs) hits them alike; step, products and rest
are medians over the turns. For every model after the first it prints its speed-up over the first (the
median of the turn-by-turn ratios, of the decode step and of the whole 128-token run) and two estimates of
what its products alone give, not bounds: step₀ / (step₀ − products₀ + productsᵢ) if the rest costs what it
costs the first model (as for a prune of the same attention, cache, output layer and op count), and
products₀ / productsᵢ if there were no rest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dadpo.engine import Engine, resolve_precision
from dadpo.models import load_model
from generation_throughput import SAMPLE, engine_ids, prompt_sets, write_report

ROWS = 32


def product_ms(model, engine: Engine, reps: int) -> float:
    """Milliseconds of one decode step's prepacked products at `ROWS` rows, timed alone."""
    dtype = engine.compute_dtype or model.dtype
    calls = []
    for layer, module in zip(engine.layers, model.model.layers, strict=True):
        attn, mlp = module.self_attn, module.mlp
        for linear, inputs in ((layer.qkv, attn.q_proj.in_features), (layer.o, attn.o_proj.in_features),
                               (layer.gate_up, mlp.gate_proj.in_features), (layer.down, mlp.down_proj.in_features)):
            calls.append((linear, torch.randn(ROWS, 1, inputs, dtype=dtype)))
    calls.append((engine.head, torch.randn(ROWS, 1, model.lm_head.in_features, dtype=dtype)))
    times = []
    with torch.inference_mode():
        for rep in range(reps + 3):
            start = time.perf_counter()
            for linear, x in calls:
                linear.whole(x)
            if rep >= 3:  # three warm-up passes
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def step_ms(model, tok, convs, new_tokens: int) -> tuple[float, float]:
    """Decode milliseconds per step and the engine's whole run in seconds, from runs of `new_tokens` and 1."""
    _, first = engine_ids(model, tok, convs, SAMPLE, ROWS, 1, [])
    out, whole = engine_ids(model, tok, convs, SAMPLE, ROWS, new_tokens, [])
    assert all(len(v) == new_tokens for v in out.values())
    return 1e3 * (whole - first) / (new_tokens - 1), whole


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,runs/p20", help="comma-separated model specs")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3,
                    help="turns: in each, every model runs the engine (1 and max-new-tokens) and times its products")
    ap.add_argument("--reps", type=int, default=20, help="timed passes over the products in each turn")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    convs = prompt_sets(args.data, ["train"])["train"]
    specs = args.models.split(",")
    models, engines = {}, {}
    for spec in specs:
        model, tok = load_model(spec, dtype="float32")
        bf16 = resolve_precision("auto", model, SAMPLE["temperature"]) == "bfloat16"
        models[spec] = (model, tok)
        engines[spec] = Engine(model, [], slots=ROWS, max_new_tokens=1, bf16=bf16, **SAMPLE)  # its products
        engine_ids(model, tok, convs[:2], SAMPLE, 2, 4, [])  # warm-up
    runs = {spec: [] for spec in specs}  # (step ms, whole run s, products ms) per turn
    for turn in range(args.runs):
        for spec in specs if turn % 2 == 0 else specs[::-1]:  # every other turn in reverse: no model always first
            model, tok = models[spec]
            runs[spec].append((*step_ms(model, tok, convs, args.max_new_tokens),
                               product_ms(model, engines[spec], args.reps)))
        print(f"turn {turn + 1}: " + ", ".join(f"{spec} step {runs[spec][-1][0]:.1f} ms, products "
                                               f"{runs[spec][-1][2]:.1f} ms" for spec in specs), flush=True)
    results = []
    for spec in specs:
        step, _, products = (statistics.median(column) for column in zip(*runs[spec], strict=True))
        rest = statistics.median(s - p for s, _, p in runs[spec])
        row = {"model": spec, "precision": "bfloat16" if engines[spec].compute_dtype else "float32",
               "params": sum(p.numel() for p in models[spec][0].parameters()),
               "step_ms": [round(s, 1) for s, _, _ in runs[spec]], "run_s": [round(w, 2) for _, w, _ in runs[spec]],
               "products_ms": [round(p, 1) for _, _, p in runs[spec]], "median_step_ms": round(step, 1),
               "median_products_ms": round(products, 1), "median_rest_ms": round(rest, 1)}
        print(f"{spec} ({row['precision']}): step {step:.1f} ms, products {products:.1f} ms, rest {rest:.1f} ms "
              f"(medians)", flush=True)
        if spec != specs[0]:
            base = runs[specs[0]]
            base_step, _, base_products = (statistics.median(column) for column in zip(*base, strict=True))
            row["vs_first"] = {
                "step_per_run": [round(b[0] / r[0], 3) for b, r in zip(base, runs[spec], strict=True)],
                "run_per_run": [round(b[1] / r[1], 3) for b, r in zip(base, runs[spec], strict=True)],
                "products_if_rest_unchanged": round(base_step / (base_step - base_products + products), 3),
                "products_if_no_rest": round(base_products / products, 3)}
            vs = row["vs_first"]
            vs["step"], vs["run"] = (round(statistics.median(vs[f"{k}_per_run"]), 3) for k in ("step", "run"))
            print(f"  vs {specs[0]}: decode step {vs['step']}x {vs['step_per_run']}, whole run {vs['run']}x "
                  f"{vs['run_per_run']}; its products alone would give {vs['products_if_rest_unchanged']}x with "
                  f"the first's rest, {vs['products_if_no_rest']}x with none", flush=True)
        results.append(row)
    write_report({"rows": ROWS, "max_new_tokens": args.max_new_tokens, "results": results}, args.json)


if __name__ == "__main__":
    main()
