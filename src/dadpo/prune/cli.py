"""`dadpo prune`: prune a model to a fraction of its parameters and save it with its reports."""

from __future__ import annotations

import argparse

from dadpo.errors import DadpoError
from dadpo.io import check_out_path


def register(subparsers) -> None:
    from dadpo.cli import add_model_args
    from dadpo.prune.config import ALLOCATIONS, IMPORTANCES, TARGETS, PruneConfig

    def default(field: str):
        return PruneConfig.model_fields[field].default

    p = subparsers.add_parser(
        "prune", help="prune a model to a parameter ratio",
        description="Structured, GQA-aware pruning of MLP channels and attention heads with torch-pruning, "
        "to an exact fraction of ALL parameters (embeddings counted, ±0.5 pp). Saves safetensors + config + "
        "tokenizer + pruning.json + report.json/report.md (parameters, time, memory, WikiText-2 perplexity "
        "before/after, a sample answer) into --out, atomically. Uniform results load with plain "
        "AutoModelForCausalLM.from_pretrained; non-uniform ones after `import dadpo.modeling_dadpo_pruned`, "
        "or anywhere with trust_remote_code=True (the folder carries that module).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (must be empty or new unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--ratio", type=float, default=default("ratio"),
                   help="fraction of all parameters to remove, in (0, 0.9]")
    p.add_argument("--importance", default=default("importance"), choices=IMPORTANCES,
                   help="taylor = |w·dL/dw| on calibration data; activation = |w|·||x||; magnitude = L2")
    p.add_argument("--targets", default=default("targets"), choices=TARGETS,
                   help="prune MLP channels, attention heads, or both (mlp measured best on SmolLM2)")
    p.add_argument("--layers", help='decoder layers to prune as start:end (default: all); keeping the first and '
                   'last layers whole (LLM-Pruner style, e.g. 4:28 of 30) matters a lot for quality')
    p.add_argument("--allocation", default=default("allocation"), choices=ALLOCATIONS,
                   help="uniform = same widths in every pruned layer; global = widths by importance per layer")
    p.add_argument("--calib", default=default("calib"),
                   help="calibration prompt set (alias under $DADPO_DATA_DIR, file, hub id)")
    p.add_argument("--calib-samples", type=int, default=default("calib_samples"), help="calibration sequences")
    p.add_argument("--calib-skip", type=int, default=default("calib_skip"),
                   help=PruneConfig.model_fields["calib_skip"].description)
    p.add_argument("--calib-max-len", type=int, default=default("calib_max_len"),
                   help="tokens per calibration sequence")
    p.add_argument("--calib-batch-size", type=int, default=default("calib_batch_size"),
                   help="calibration sequences per forward/backward; Taylor sums |w·g| per batch, so 1 = "
                   "per-sample (measured best on SmolLM2)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=default("reconstruct"),
                   help="after cutting, refit the kept input columns of down_proj/o_proj by least squares on "
                   "the calibration inputs (uses calibration data even for magnitude/random)")
    p.add_argument("--reconstruct-damping", type=float, default=default("reconstruct_damping"),
                   help="ridge damping of the refit, as a fraction of the mean diagonal of XᵀX")
    p.add_argument("--mlp-round-to", type=int, default=default("mlp_round_to"),
                   help="cut MLP widths in blocks of this many channels")
    p.add_argument("--seed", type=int, default=default("seed"),
                   help="seed for calibration sampling and random importance")
    p.add_argument("--ppl-seq-len", type=int, default=default("ppl_seq_len"), help="perplexity window length")
    p.add_argument("--ppl-max-windows", type=int, help="evaluate perplexity on at most N windows (0 = skip; "
                   "default: the whole WikiText-2 test text)")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args) -> int:
    from pydantic import ValidationError

    from dadpo.prune.api import prune_to_dir
    from dadpo.prune.config import PruneConfig, config_error

    fields = ("ratio", "importance", "targets", "layers", "allocation", "calib", "calib_samples", "calib_skip",
              "calib_max_len", "calib_batch_size", "reconstruct", "reconstruct_damping", "mlp_round_to", "seed",
              "ppl_seq_len", "ppl_max_windows")
    try:
        config = PruneConfig(**{f: getattr(args, f) for f in fields})
    except ValidationError as e:
        raise DadpoError(config_error(e, flags=True)) from None
    # the pruned model is made beside --out and renamed onto it: both places must take writes, and this is
    # known now, not after minutes of pruning
    check_out_path(args.out, "--out", folder=True, replaced=True)
    r = prune_to_dir(args.model, args.out, config, overwrite=args.overwrite, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code)
    ppl = [r[k].get("perplexity") for k in ("before", "after")]
    ppl_text = f", perplexity {ppl[0]['ppl']:.2f} → {ppl[1]['ppl']:.2f}" if all(ppl) else ""
    print(f"removed {100 * r['ratio_achieved']:.2f}% of parameters ({r['params_before']['total']:,} → "
          f"{r['params_after']['total']:,}){ppl_text}; saved to {args.out}")
    return 0
