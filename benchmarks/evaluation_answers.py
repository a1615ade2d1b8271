"""Where an evaluation pass's answer time goes: the engine's prefill and decode steps, timed apart.

Usage:
    python benchmarks/evaluation_answers.py --prompts runs/sweep/validation.jsonl [--model smollm2-135m-instruct]
        [--limit 64] [--seeds 10,20,30] [--temperature 1.0] [--top-p 1.0] [--batch-size 32]

Answers every prompt once per seed (≤ 128 new tokens, stopping at the end-of-turn token, as evaluation
does) twice: the seeds one after another, then all of them from one queue as evaluation does (and checks
that both give the same answers). For each, it prints tokens/s with the wall time spent in
`Engine._prefill` (the prompts admitted at once: one in float32, all free slots' in bf16) and
`Engine._decode` (one token for every active row), the number of decode steps and their mean active rows and
attention spans (see `Engine._decode`).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import dadpo.engine as engine
from dadpo.data import chat_prompt, load_prompts
from dadpo.decoding import GenerationConfig
from dadpo.generation import answer_stream, iter_answers
from dadpo.models import load_model

seconds, calls, rows, spans = Counter(), Counter(), Counter(), Counter()


def timed(name: str):
    inner = getattr(engine.Engine, name)

    def wrapper(self, *args):
        if name == "_decode":
            rows["all"] += len(args[0])
            spans["all"] += len({engine._span(r.length + 1) for r in args[0]})
        t = time.perf_counter()
        out = inner(self, *args)
        seconds[name] += time.perf_counter() - t
        calls[name] += 1
        return out

    setattr(engine.Engine, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--seeds", default="10,20,30")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    model, tok = load_model(args.model)
    records = load_prompts(args.prompts)[: args.limit]
    lengths = sorted(len(tok(chat_prompt(tok, r.messages), add_special_tokens=False).input_ids) for r in records)
    print(f"{len(records)} prompts: {sum(lengths)} tokens, median {lengths[len(lengths) // 2]}, "
          f"longest {lengths[-1]}")
    timed("_prefill")
    timed("_decode")
    seeds = [int(s) for s in args.seeds.split(",")]
    cfgs = [GenerationConfig(max_new_tokens=128, temperature=args.temperature, top_p=args.top_p,
                             batch_size=args.batch_size, seed=seed) for seed in seeds]
    # seeds one after another (each queue drains at its end), then every seed's prompts in one queue
    apart = report("seeds one after another", lambda: {
        (c.seed, row["id"]): row for c in cfgs for row in iter_answers(model, tok, records, c)})
    together = report("one queue", lambda: {
        (seeds[k // len(records)], row["id"]): row
        for k, row in answer_stream(model, tok, records * len(seeds), cfgs[0], [s for s in seeds for _ in records])})
    print(f"same answers both ways: {apart == together}")


def report(what: str, answer) -> dict:
    """Run `answer` (→ its rows), print its wall time, tokens/s and the engine timers; the rows."""
    for c in (seconds, calls, rows, spans):
        c.clear()
    t0 = time.perf_counter()
    answers = answer()
    wall = time.perf_counter() - t0
    tokens = sum(row["new_tokens"] for row in answers.values())
    print(f"{what}: {len(answers)} answers, {tokens} new tokens in {wall:.1f} s ({tokens / wall:.1f} tokens/s); "
          f"prefill {seconds['_prefill']:.1f} s in {calls['_prefill']} calls; decode {seconds['_decode']:.1f} s "
          f"in {calls['_decode']} steps ({1000 * seconds['_decode'] / calls['_decode']:.0f} ms a step, "
          f"{rows['all'] / calls['_decode']:.1f} rows, {spans['all'] / calls['_decode']:.1f} attention spans)",
          flush=True)
    return answers

if __name__ == "__main__":
    main()
