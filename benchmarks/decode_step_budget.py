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

The models load together and take turns run by run (this box's speed drifts by 5–15% between runs). For
every model after the first it prints its decode-step speed-up over the first (the median of the run-by-run
ratios) and the most its products can give: step₀ / (step₀ − products₀ + productsᵢ) if everything else costs
what it costs the first model (as for a prune that keeps every key/value head: same attention reads, cache,
output layer and op count; only the sampler's cost follows the model's distributions), and
products₀ / productsᵢ if nothing but the products cost anything.
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
    for layer, module in zip(engine.layers, model.model.layers, strict=False):
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
                    help="engine runs per model (each: 1 and max-new-tokens), the models taking turns")
    ap.add_argument("--reps", type=int, default=30, help="timed passes over the products")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    convs = prompt_sets(args.data, ["train"])["train"]
    specs = args.models.split(",")
    models = {spec: load_model(spec, dtype="float32") for spec in specs}
    bf16 = {spec: resolve_precision("auto", model, SAMPLE["temperature"]) == "bfloat16"
            for spec, (model, _) in models.items()}
    for model, tok in models.values():
        engine_ids(model, tok, convs[:2], SAMPLE, 2, 4, [])  # warm-up
    steps = {spec: [] for spec in specs}
    for run in range(args.runs):  # the models take turns, so that the box's drift hits them alike
        for spec, (model, tok) in models.items():
            steps[spec].append(step_ms(model, tok, convs, args.max_new_tokens))
        print(f"run {run + 1}: " + ", ".join(f"{spec} {steps[spec][-1][0]:.1f} ms" for spec in specs), flush=True)
    results = []
    for spec, (model, _) in models.items():
        engine = Engine(model, [], slots=ROWS, max_new_tokens=1, bf16=bf16[spec], **SAMPLE)
        products = product_ms(model, engine, args.reps)
        step = statistics.median(s for s, _ in steps[spec])
        row = {"model": spec, "precision": "bfloat16" if bf16[spec] else str(model.dtype).removeprefix("torch."),
               "params": sum(p.numel() for p in model.parameters()),
               "step_ms": [round(s, 1) for s, _ in steps[spec]], "run_s": [round(w, 2) for _, w in steps[spec]],
               "products_ms": round(products, 1), "rest_ms": round(step - products, 1)}
        print(f"{spec} ({row['precision']}): step median {step:.1f} ms, products {products:.1f} ms, "
              f"rest {step - products:.1f} ms", flush=True)
        if results:
            base = results[0]
            base_step = statistics.median(base["step_ms"])
            pairs = [b / s for (s, _), b in zip(steps[spec], base["step_ms"], strict=True)]
            row["vs_first"] = {
                "measured_per_run": [round(r, 3) for r in pairs],
                "measured": round(statistics.median(pairs), 3),
                "bound_same_rest": round(base_step / (base_step - base["products_ms"] + products), 3),
                "bound_products_only": round(base["products_ms"] / products, 3)}
            print(f"  decode step vs {base['model']}: measured {row['vs_first']['measured']}x (median of "
                  f"{row['vs_first']['measured_per_run']}); from its products at most "
                  f"{row['vs_first']['bound_same_rest']}x (rest as the first's), "
                  f"{row['vs_first']['bound_products_only']}x (nothing but products)", flush=True)
        results.append(row)
        del engine
    write_report({"rows": ROWS, "max_new_tokens": args.max_new_tokens, "results": results}, args.json)


if __name__ == "__main__":
    main()
