"""Does a sampled answer depend on the batch? The engine's answers at several slot counts, compared per prompt.

Usage:
    python benchmarks/batch_invariance.py [--model smollm2-135m-instruct] [--prompts 96] [--max-new-tokens 48] \\
        [--batch-sizes 8,32,64,96] [--precision bfloat16|model] [--data-dir ../shared/data]

Samples the first `--prompts` Dolly training prompts (rows 80 on) at recover's settings (temperature 0.7,
top-p 0.95), each from its own seed, once per batch size, and prints per batch size the wall time (engine
set-up included) and how many answers differ from those at the smallest batch size (0 everywhere =
batch-invariant). The engine runs through `generation_throughput.engine_ids`.
"""

from __future__ import annotations

import argparse

from dadpo.data import load_prompts
from dadpo.models import chat_end_token_ids, load_model
from generation_throughput import SAMPLE, engine_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-sizes", default="8,32,64,96")
    ap.add_argument("--precision", choices=["bfloat16", "model"], default="bfloat16")
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    rows = load_prompts(f"{args.data_dir}/dolly15k/databricks-dolly-15k.jsonl")[80:80 + args.prompts]
    convs = [r.messages for r in rows]
    answers = {}
    for bs in sorted(int(b) for b in args.batch_sizes.split(",")):
        answers[bs], seconds = engine_ids(model, tok, convs, SAMPLE, bs, args.max_new_tokens, chat_end_token_ids(tok),
                                          args.precision)
        base = min(answers)
        differ = sum(answers[bs][k] != answers[base][k] for k in answers[bs])
        print(f"batch {bs}: {seconds:.1f} s, answers differing from batch {base}: {differ}/{len(convs)}", flush=True)


if __name__ == "__main__":
    main()
