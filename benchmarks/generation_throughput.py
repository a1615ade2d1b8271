"""Batched vs single-prompt generation throughput on the embedded model (issue: ≥ 4× tokens/s at bs 16).

Usage: python benchmarks/generation_throughput.py [--prompts N] [--max-new-tokens 128] [--data DIR]
Both settings answer the same prompts with greedy decoding and a fixed number of new tokens
(min_new_tokens = max_new_tokens, so both produce exactly the same token count).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dadpo.data import load_prompts
from dadpo.generation import GenerationConfig, generate_batch
from dadpo.models import load_model


def run(model, tok, convs, bs, new_tokens):
    cfg = GenerationConfig(max_new_tokens=new_tokens, batch_size=bs)
    orig = model.generation_config.min_new_tokens
    model.generation_config.min_new_tokens = new_tokens  # equal work: no early stops
    t = time.perf_counter()
    n = 0
    for start in range(0, len(convs), bs):
        n += sum(k for _, k, _ in generate_batch(model, tok, convs[start:start + bs], cfg))
    model.generation_config.min_new_tokens = orig
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default="../shared/data/vicuna_bench")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    convs = [r.messages for r in load_prompts(args.data)[: args.prompts]]
    run(model, tok, convs[:2], 2, 4)  # warm-up
    res = {}
    for bs in (1, 16):
        n, dt = run(model, tok, convs, bs, args.max_new_tokens)
        res[bs] = {"tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1)}
        print(f"bs={bs:2d}: {n} tokens in {dt:.1f}s = {n / dt:.1f} tok/s")
    print(f"speed-up bs16/bs1: {res[16]['tok_per_s'] / res[1]['tok_per_s']:.2f}x")
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                      "results": res}))


if __name__ == "__main__":
    main()
