"""`dadpo prune`: prune a model to a fraction of its parameters and save it with its reports."""

from __future__ import annotations

import argparse

from dadpo.errors import ConfigError
from dadpo.io import check_out_path, hold_output
from dadpo.settings import add_config_flags, as_flag_error, flag_name, validated

#: the PruneConfig fields that are flags (the rest — sample prompt, perplexity corpus — are recipe keys)
FLAGS = ("ratio", "importance", "targets", "layers", "allocation", "calib", "calib_samples", "calib_skip",
         "calib_max_len", "calib_batch_size", "reconstruct", "reconstruct_damping", "mlp_round_to", "seed",
         "ppl_seq_len", "ppl_window_stride", "ppl_max_windows")

_DESCRIPTION = (
    "Structured, GQA-aware pruning of MLP channels and attention heads with torch-pruning, to an exact fraction "
    "of ALL parameters (embeddings counted, ±0.5 pp). Saves safetensors + config + tokenizer + pruning.json + "
    "report.json/report.md (parameters, time, memory, WikiText-2 perplexity before/after — every 10th window "
    "by default —, a sample answer) into --out, atomically. Uniform results load with plain "
    "AutoModelForCausalLM.from_pretrained; non-uniform ones after `import dadpo.modeling_dadpo_pruned`, or "
    "anywhere with trust_remote_code=True (the folder carries that module).")


def register(subparsers) -> None:
    from dadpo.cli import add_model_args
    from dadpo.prune.config import PruneConfig

    p = subparsers.add_parser("prune", help="prune a model to a parameter ratio", description=_DESCRIPTION,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (must be empty or new unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_config_flags(p, PruneConfig, FLAGS)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from dadpo.distributed import is_main
    from dadpo.prune.api import prune_to_dir
    from dadpo.prune.config import PruneConfig

    config = validated(PruneConfig, {f: getattr(args, f) for f in FLAGS}, flag_name)
    # the pruned model is made beside --out and renamed onto it: both places must take writes, and this is
    # known now, not after minutes of pruning
    check_out_path(args.out, "--out", folder=True, replaced=True)
    with hold_output(args.out, "--out"):
        if not is_main():  # under torchrun / accelerate launch: one process prunes, the others have nothing to do
            return 0
        try:
            r = prune_to_dir(args.model, args.out, config, overwrite=args.overwrite, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code)
        except ConfigError as e:
            raise as_flag_error(e, {f"prune.{f}": flag_name(f) for f in FLAGS}) from None
    ppl = [r[k].get("perplexity") for k in ("before", "after")]
    ppl_text = f", perplexity {ppl[0]['ppl']:.2f} → {ppl[1]['ppl']:.2f}" if all(ppl) else ""
    print(f"removed {100 * r['ratio_achieved']:.2f}% of parameters ({r['params_before']['total']:,} → "
          f"{r['params_after']['total']:,}){ppl_text}; saved to {args.out}")
    return 0
