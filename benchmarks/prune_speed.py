"""Decode speed of a pruned model against its dense source at batch 8 (acceptance: ≥ 1.15×).

    flock /tmp/dadpo-cpu.lock python benchmarks/prune_speed.py --pruned /tmp/dadpo-shared/smollm2-prune20

Both models answer the same 8 prompts with greedy decoding forced to exactly --new-tokens tokens; runs
alternate dense/pruned --repeats times and the median tokens/s of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dadpo.data import chat_prompt, load_prompts
from dadpo.models import load_model


@torch.inference_mode()
def tokens_per_second(model, tok, prompts: list[str], new_tokens: int) -> float:
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    dt = time.perf_counter() - t0
    return (out.shape[1] - enc.input_ids.shape[1]) * len(prompts) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", default="smollm2-135m-instruct")
    ap.add_argument("--pruned", required=True, help="directory written by `dadpo prune`")
    ap.add_argument("--prompts", default="/work/shared/data/vicuna_bench")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    models = {"dense": load_model(args.dense), "pruned": load_model(args.pruned)}
    tok = models["dense"][1]
    prompts = [chat_prompt(tok, r.messages) for r in load_prompts(args.prompts)[: args.batch_size]]
    for model, t in models.values():  # warm-up
        tokens_per_second(model, t, prompts[:2], 4)
    speeds: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, (model, t) in models.items():
            speeds[name].append(tokens_per_second(model, t, prompts, args.new_tokens))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()}
    result = {"batch_size": args.batch_size, "new_tokens": args.new_tokens, "tokens_per_s": med,
              "all_runs": speeds, "params": params, "speedup": med["pruned"] / med["dense"],
              "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
