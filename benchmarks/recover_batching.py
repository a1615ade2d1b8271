"""What `recover.group_by_length` saves: padding and wall time of whole training epochs, random batches against
length-grouped ones, in one process on the same model and data.

The science recipe's training prompts (Dolly rows 428–939, prompts cut at 256 tokens) with Dolly's own human
responses (cut at 96 tokens) standing in for the teacher's answers, which need a recover run to exist; the
stand-in only sets the lengths. Padding is measured on all the prompts over three seeds; time on whole epochs of
`--prompts` of them (a prefix of an epoch would be biased: grouped epochs put their longest batch first), dSFT,
batch 4, bf16 autocast as the recipe trains.

    python benchmarks/recover_batching.py --data-dir ../shared/data [--model smollm2-135m-instruct] \\
        [--prompts 128] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SKIP, TRAIN, BATCH, PROMPT_LEN, RESPONSE_LEN = 428, 512, 4, 256, 96


def padding_share(lengths: list[int], order: list[int]) -> float:
    """Padded positions / all positions when `order` is cut into batches of BATCH, each padded to its longest."""
    padded = real = 0
    for s in range(0, len(order), BATCH):
        batch = [lengths[i] for i in order[s:s + BATCH]]
        padded += len(batch) * max(batch)
        real += sum(batch)
    return 1 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=128, help="prompts of each timed epoch")
    ap.add_argument("--out", help="write the results JSON here")
    args = ap.parse_args()

    import torch
    from transformers.trainer_utils import set_seed

    from dadpo.data import load_prompts
    from dadpo.models import load_model
    from dadpo.recover.batching import LengthGroupedOrder, example_length
    from dadpo.recover.config import RecoverConfig
    from dadpo.recover.pairs import encode_example
    from dadpo.recover.training import build_trainer

    records = load_prompts("dolly", data_dir=args.data_dir)[SKIP:SKIP + TRAIN]
    _, tok = load_model(args.model)
    examples = [encode_example(tok, r.id, r.messages, r.reference or "", None, PROMPT_LEN, RESPONSE_LEN)
                for r in records]
    lengths = [example_length(ex) for ex in examples]
    result: dict = {"model": args.model, "threads": torch.get_num_threads(), "padding": {}, "epochs": {}}
    for seed in (0, 1, 2):
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        grouped = list(LengthGroupedOrder(lengths, BATCH, seed))
        result["padding"][seed] = {"random": padding_share(lengths, shuffled),
                                   "grouped": padding_share(lengths, grouped)}
        print(f"padding over {len(lengths)} prompts, seed {seed}: random {result['padding'][seed]['random']:.1%}, "
              f"grouped {result['padding'][seed]['grouped']:.1%}", flush=True)

    subset = examples[:args.prompts]
    for grouping in (False, True, False, True):  # alternated: a drift of the machine's speed hits both
        cfg = RecoverConfig(method="dsft", batch_size=BATCH, bf16=True, group_by_length=grouping)
        model, tok = load_model(args.model)
        set_seed(0)
        trainer = build_trainer(model, tok, subset, cfg, "dsft", tempfile.mkdtemp(), save_strategy="no")
        tokens = [0, 0]

        def count(batch, collate=trainer.data_collator, tokens=tokens):
            out = collate(batch)
            tokens[0] += out["input_ids"].numel()
            tokens[1] += int(out["attention_mask"].sum())
            return out

        trainer.data_collator = count
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        name = "grouped" if grouping else "random"
        result["epochs"].setdefault(name, []).append({"seconds": seconds, "padded_tokens": tokens[0],
                                                      "real_tokens": tokens[1]})
        print(f"{name}: one epoch of {len(subset)} prompts in {seconds:.1f} s, "
              f"padding {1 - tokens[1] / tokens[0]:.1%}", flush=True)
    best = {k: min(e["seconds"] for e in v) for k, v in result["epochs"].items()}
    result["speedup"] = best["random"] / best["grouped"]
    print(f"best epoch: random {best['random']:.1f} s, grouped {best['grouped']:.1f} s: {result['speedup']:.2f}×")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
