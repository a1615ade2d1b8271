"""Does bf16 sampling draw from the model's float32 distribution? Samples the same prompts with the engine in
float32 and in bf16, each under seeds 0 and 1, scores every answer's per-token NLL under the float32 model,
and prints differences of means with paired 95% bootstrap CIs over prompts. Like is compared with like:
bf16 against float32 across seeds (independent draws) next to seed 1 against seed 0 within one precision.
Under one seed the two precisions share their uniforms, so those pairs are correlated; they are printed
last, apart.

Usage:
    python benchmarks/sampling_precision.py [--data-dir ../shared/data] [--prompts 128] [--skip 428]
"""

from __future__ import annotations

import argparse
from collections import deque

import torch

from dadpo.data import chat_prompt, load_prompts
from dadpo.engine import Engine, Request, request_seed
from dadpo.evaluate.reference import paired_difference
from dadpo.models import chat_end_token_ids, load_model


def own_nll(model, prompt: list[int], answer: list[int]) -> float:
    """Per-token NLL of `answer` after `prompt` under the model's own float32 forward."""
    logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()
    return -torch.log_softmax(logits, -1).gather(-1, torch.tensor(answer)[:, None]).mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--skip", type=int, default=428,
                    help="Dolly rows skipped (428: the first of the science recipe's training rows)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype="float32", device="cpu")  # the engine's bf16 path is a CPU one
    rows = load_prompts("dolly", data_dir=args.data_dir)[args.skip:args.skip + args.prompts]
    ids = [tok(chat_prompt(tok, r.messages), add_special_tokens=False)["input_ids"][-256:] for r in rows]
    nll: dict[tuple[str, int], dict[int, float]] = {}
    with torch.inference_mode():
        for precision in ("float32", "bfloat16"):
            for seed in (0, 1):
                engine = Engine(model, chat_end_token_ids(tok), slots=32, max_new_tokens=args.max_new_tokens,
                                temperature=0.7, top_p=0.95, bf16=precision == "bfloat16")
                queue = deque(Request(i, ids[i], request_seed(seed, i)) for i in range(len(ids)))
                answers = {r.key: r.tokens for r in engine.stream(queue)}
                nll[precision, seed] = {i: own_nll(model, ids[i], a) for i, a in answers.items() if a}
                scores = nll[precision, seed]
                print(f"{precision} seed {seed}: mean per-token NLL {sum(scores.values()) / len(scores):.4f} over "
                      f"{len(scores)} answers", flush=True)
    for name, a, b in (("bf16 seed 1 - float32 seed 0", ("bfloat16", 1), ("float32", 0)),
                       ("bf16 seed 0 - float32 seed 1", ("bfloat16", 0), ("float32", 1)),
                       ("float32 seed 1 - seed 0", ("float32", 1), ("float32", 0)),
                       ("bf16 seed 1 - seed 0", ("bfloat16", 1), ("bfloat16", 0)),
                       ("same uniforms: bf16 - float32, seed 0", ("bfloat16", 0), ("float32", 0)),
                       ("same uniforms: bf16 - float32, seed 1", ("bfloat16", 1), ("float32", 1))):
        diff = paired_difference(nll[a], nll[b], samples=2000)
        print(f"{name}: {diff['delta']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]")


if __name__ == "__main__":
    main()
