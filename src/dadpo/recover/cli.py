"""`dadpo recover`: every RecoverConfig field as a flag (defaults shown in --help come from the config)."""

from __future__ import annotations

import argparse

from dadpo.decoding import DecodingConfig
from dadpo.io import check_out_path
from dadpo.recover.config import DSFTConfig, KDConfig, LoraConfig, RecoverConfig, SamplingConfig
from dadpo.settings import add_config_flags, field_help, flag_name

_D, _KD, _LORA, _S, _SFT = RecoverConfig(), KDConfig(), LoraConfig(), SamplingConfig(), DSFTConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "recover", help="distil a pruned student from its teacher (daDPO, dDPO, dSFT, token KD)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Recover a pruned student from its teacher: sample teacher responses, distilled SFT "
        "(dSFT, gives π_ref), sample student responses, score both with π_ref and the teacher once, then "
        "train with --method. Every step is cached in --out; rerunning the same command after an "
        "interruption resumes (training from its last checkpoint). The result is OUT/model, a plain "
        "from_pretrained directory, and OUT/metrics.json.")
    p.add_argument("--student", required=True, help="student model: directory, .gguf or alias")
    p.add_argument("--teacher", required=True, help="teacher model (same tokenizer as the student)")
    p.add_argument("--prompts", required=True, help="training prompt set: file, directory or alias (e.g. dolly)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="discard a run already in --out")
    p.add_argument("--method", choices=["dsft", "kd", "dpo", "dadpo"], default=_D.method,
                   help="dsft: stop after distilled SFT; kd: token KD; dpo: dDPO; dadpo: distribution-aware DPO")
    p.add_argument("--beta1", type=float, default=_D.beta1, help="β1, KL weight to π_ref (the DPO β)")
    p.add_argument("--beta2", type=float, default=_D.beta2, help="β2, KL weight to the teacher (daDPO)")
    p.add_argument("--margin", choices=["sum", "mean"], default=_D.margin, help=field_help(RecoverConfig, "margin"))
    p.add_argument("--lr", type=float, default=_D.lr, help="learning rate of the last stage")
    p.add_argument("--epochs", type=float, default=_D.epochs, help="epochs of the last stage")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="pairs/sequences per step")
    p.add_argument("--grad-accum", type=int, default=_D.grad_accum, help="gradient accumulation steps")
    p.add_argument("--max-prompt-len", type=int, default=_D.max_prompt_len, help="prompt tokens kept")
    p.add_argument("--max-response-len", type=int, default=_D.max_response_len, help="response tokens kept")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and scoring")
    p.add_argument("--activation-checkpointing", choices=["none", "selective", "full"],
                   default=_D.activation_checkpointing,
                   help="recompute activations in backward to save memory (selective: only elementwise ops)")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed for sampling, data order and init")
    p.add_argument("--warmup-ratio", type=float, default=_D.warmup_ratio, help="linear warmup fraction")
    p.add_argument("--save-steps", type=int, default=_D.save_steps, help="checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, default=_D.logging_steps,
                   help=field_help(RecoverConfig, "logging_steps"))
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default=_D.report_to,
                   help=field_help(RecoverConfig, "report_to"))
    p.add_argument("--skip-prompts", type=int, default=_D.skip_prompts,
                   help=RecoverConfig.model_fields["skip_prompts"].description)
    p.add_argument("--train-prompts", type=int, default=None, help="train on N prompts (default: all)")
    p.add_argument("--eval-prompts", type=int, default=_D.eval_prompts,
                   help="hold out the first N prompts (after --skip-prompts) for evaluation pairs and NLL")
    g = p.add_argument_group("token KD")
    g.add_argument("--kd-kind", choices=["fwd", "rev", "jsd"], default=_KD.kind, help="divergence")
    g.add_argument("--kd-top-k", type=int, default=_KD.top_k, help="teacher log-probs cached per position")
    g.add_argument("--kd-weight", type=float, default=_KD.weight, help="KD weight added to the loss")
    g.add_argument("--kd-jsd-beta", type=float, default=_KD.jsd_beta, help="β of generalized JSD")
    g = p.add_argument_group("LoRA (default: full fine-tuning)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters, merged on save")
    g.add_argument("--lora-r", type=int, default=_LORA.r, help="rank")
    g.add_argument("--lora-alpha", type=int, default=_LORA.alpha, help="alpha")
    g.add_argument("--lora-dropout", type=float, default=_LORA.dropout, help="dropout")
    g.add_argument("--lora-target-modules", default=",".join(_LORA.target_modules), help="comma-separated")
    g = p.add_argument_group("pair sampling")
    add_config_flags(g, SamplingConfig, DecodingConfig.model_fields, renames={"batch_size": "gen_batch_size"})
    g.add_argument("--student-from", choices=["dsft", "student"], default=_S.student_from,
                   help="model that samples the rejected responses")
    g = p.add_argument_group("dSFT stage (gives π_ref)")
    g.add_argument("--dsft-epochs", type=float, default=_SFT.epochs, help="epochs")
    g.add_argument("--dsft-lr", type=float, default=_SFT.lr, help="learning rate")
    p.set_defaults(func=cmd_recover)


def config_from_args(args) -> RecoverConfig:
    """The RecoverConfig the flags describe (one-line DadpoError naming the field on bad values)."""
    lora = None
    if args.lora:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                "target_modules": [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]}
    return RecoverConfig.parse({
        "method": args.method, "beta1": args.beta1, "beta2": args.beta2, "margin": args.margin, "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_prompt_len": args.max_prompt_len,
        "max_response_len": args.max_response_len, "bf16": args.bf16, "seed": args.seed,
        "activation_checkpointing": args.activation_checkpointing,
        "warmup_ratio": args.warmup_ratio, "save_steps": args.save_steps, "train_prompts": args.train_prompts,
        "logging_steps": args.logging_steps, "report_to": args.report_to,
        "skip_prompts": args.skip_prompts, "eval_prompts": args.eval_prompts, "lora": lora,
        "kd": {"kind": args.kd_kind, "top_k": args.kd_top_k, "weight": args.kd_weight,
               "jsd_beta": args.kd_jsd_beta},
        "sampling": {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                     "batch_size": args.gen_batch_size, "student_from": args.student_from,
                     "precision": args.precision},
        "dsft": {"epochs": args.dsft_epochs, "lr": args.dsft_lr},
    }, name=_flag)


_FLAG_RENAMES = {"sampling.batch_size": "gen-batch-size", "lora": "lora-target-modules"}


def _flag(loc: str) -> str:
    """Config location → the flag that sets it (sampling.top_p → --top-p, kd.top_k → --kd-top-k)."""
    if not loc:
        return "recover"
    if loc in _FLAG_RENAMES:
        return "--" + _FLAG_RENAMES[loc]
    section, _, key = loc.partition(".")
    key = key.split(".")[0] if key else section
    prefix = {"kd": "kd-", "lora": "lora-", "dsft": "dsft-", "sampling": ""}.get(section, "")
    return flag_name(prefix + key if section in ("kd", "lora", "dsft", "sampling") else section)


def cmd_recover(args) -> int:
    from dadpo.recover.pipeline import run_recover

    cfg = config_from_args(args)
    check_out_path(args.out, "--out", folder=True)
    metrics = run_recover(args.student, args.teacher, args.prompts, args.out, cfg, overwrite=args.overwrite)
    print(f"recovered model in {args.out}/model; metrics: {metrics}")
    return 0
