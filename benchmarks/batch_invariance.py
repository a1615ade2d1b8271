"""Does a sampled answer depend on the batch? The engine's answers at several slot counts, compared per prompt.

Usage:
    python benchmarks/batch_invariance.py [--model smollm2-135m-instruct] [--prompts 96] [--max-new-tokens 48] \\
        [--batch-sizes 8,32,64,96] [--precision bfloat16|model] [--data-dir ../shared/data]

Samples the first `--prompts` Dolly training prompts (rows 80 on) at recover's settings (temperature 0.7,
top-p 0.95), each from its own seed, once per batch size, and prints per batch size the wall time and how
many answers differ from those at the smallest batch size (0 everywhere = batch-invariant).
"""

from __future__ import annotations

import argparse
import time
from collections import deque

from dadpo.data import chat_prompt, load_prompts
from dadpo.engine import Engine, Request, request_seed
from dadpo.models import chat_end_token_ids, load_model


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
    ids = [tok(chat_prompt(tok, r.messages), add_special_tokens=False)["input_ids"] for r in rows]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first, as generate_to_file does
    answers = {}
    for bs in sorted(int(b) for b in args.batch_sizes.split(",")):
        engine = Engine(model, chat_end_token_ids(tok), slots=bs, max_new_tokens=args.max_new_tokens,
                        temperature=0.7, top_p=0.95, bf16=args.precision == "bfloat16")
        start = time.perf_counter()
        answers[bs] = {r.key: r.tokens for r in engine.stream(
            deque(Request(i, ids[i], request_seed(0, i)) for i in order))}
        base = min(answers)
        differ = sum(answers[bs][k] != answers[base][k] for k in answers[bs])
        print(f"batch {bs}: {time.perf_counter() - start:.1f} s, answers differing from batch {base}: "
              f"{differ}/{len(ids)}", flush=True)


if __name__ == "__main__":
    main()
