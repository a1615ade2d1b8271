"""Benchmark: WikiText-2 / PTB token perplexity (GPTQ/LLM-Pruner protocol) of a model, with wall time.

python benchmarks/evaluate_perplexity.py --corpora wikitext2 --seq-lens 128,2048 --out /tmp/ppl.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dadpo.io import atomic_write_json  # noqa: E402
from dadpo.models import load_model  # noqa: E402
from dadpo.perplexity import load_corpus, perplexity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--corpora", default="wikitext2")
    p.add_argument("--seq-lens", default="128,2048")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens (default: all windows)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args()
    model, tok = load_model(args.model)
    rows = []
    for corpus in args.corpora.split(","):
        text = load_corpus(corpus, args.data_dir)
        for seq_len in map(int, args.seq_lens.split(",")):
            t0, c0 = time.perf_counter(), time.process_time()
            limit = args.max_tokens // seq_len if args.max_tokens else None
            r = perplexity(model, tok, text, seq_len=seq_len, batch_size=args.batch_size, max_windows=limit)
            r.update(corpus=corpus, wall_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
            rows.append(r)
            print(f"{corpus} seq_len={seq_len}: ppl={r['ppl']:.3f} windows={r['windows']} ({r['wall_s']}s)")
    atomic_write_json(args.out, {"model": args.model, "results": rows})


if __name__ == "__main__":
    main()
