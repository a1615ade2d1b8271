"""Quality of pruning variants on a real model: ratio hit, prune time and WikiText-2 perplexity.

    python benchmarks/prune_quality.py --variants taylor:mlp:uniform:3:29 \
        taylor:mlp:uniform:3:29,reconstruct=false --window-stride 10 --out /tmp/prune-quality.json

A variant is importance:targets:allocation[:layers][,field=value...] (layers like 4:28; fields of
PruneConfig, e.g. reconstruct=false,calib_batch_size=8). `--max-windows 0 --window-stride 1` = the whole
joined WikiText-2 test text (GPTQ / LLM-Pruner protocol); `--window-stride 10` scores every 10th window of
it (239 of 2,382 at seq_len 128), a proxy within ~1% of the whole text. Prints a Markdown table, writes
JSON rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

from dadpo.models import load_model
from dadpo.perplexity import load_corpus, perplexity
from dadpo.prune import PruneConfig, prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--variants", nargs="+", default=["taylor:both:uniform"])
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=0, help="0 = no cap")
    ap.add_argument("--window-stride", type=int, default=1, help="score every k-th window (1 = all)")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                    help="folder with wikitext2/ and dolly (default: ../shared/data beside the repository)")
    ap.add_argument("--out", help="JSON file for the rows")
    args = ap.parse_args()
    os.environ["DADPO_DATA_DIR"] = args.data_dir

    dense, tok = load_model(args.model)
    text = load_corpus("wikitext2")
    windows = args.max_windows or None
    t0 = time.time()
    def ppl(model) -> dict:
        return perplexity(model, tok, text, seq_len=args.seq_len, max_windows=windows, progress=False,
                          window_stride=args.window_stride)

    base = ppl(dense)
    rows = [{"variant": "dense", "ppl": base["ppl"], "windows": base["windows"], "ppl_s": time.time() - t0}]
    print(f"dense: ppl {base['ppl']:.2f} on {base['windows']} windows", flush=True)
    for v in args.variants:
        spec, *fields = v.split(",")
        imp, targets, alloc, *layers = spec.split(":", 3)
        extra = dict(f.split("=", 1) for f in fields)
        cfg = PruneConfig(**{"ratio": args.ratio, "importance": imp, "targets": targets, "allocation": alloc,
                             "layers": layers[0] if layers else None, "calib_samples": args.calib_samples, **extra})
        model = copy.deepcopy(dense)
        r = prune(model, tok, cfg)
        t0 = time.time()
        p = ppl(model)
        rows.append({"variant": v, "ratio": r["ratio_achieved"], "ratio_non_emb": r["ratio_achieved_non_embedding"],
                     "prune_s": r["prune_seconds"], "ppl": p["ppl"], "x_dense": p["ppl"] / base["ppl"],
                     "ppl_s": time.time() - t0, "widths": r["layer_widths"]})
        print(f"{v}: ratio {r['ratio_achieved']:.4f} prune {r['prune_seconds']:.0f}s ppl {p['ppl']:.2f} "
              f"({p['ppl'] / base['ppl']:.2f}x dense)", flush=True)
        del model
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    print("\n| variant | removed (all) | removed (non-emb) | prune s | PPL | × dense |\n|---|---|---|---|---|---|")
    print(f"| dense | 0 | 0 | – | {base['ppl']:.2f} | 1.00 |")
    for r in rows[1:]:
        print(f"| {r['variant']} | {r['ratio']:.4f} | {r['ratio_non_emb']:.4f} | {r['prune_s']:.0f} | "
              f"{r['ppl']:.2f} | {r['x_dense']:.2f} |")


if __name__ == "__main__":
    main()
