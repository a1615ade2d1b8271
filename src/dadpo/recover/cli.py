"""`dadpo recover`: every RecoverConfig field as a flag (defaults shown in --help come from the config)."""

from __future__ import annotations

import argparse

from dadpo.io import check_out_path, hold_output
from dadpo.recover.config import DSFTConfig, KDConfig, LoraConfig, RecoverConfig, SamplingConfig
from dadpo.settings import add_config_flags, field_help, flag_name

_LORA = LoraConfig()
#: RecoverConfig's own settings (its sections get prefixed flags: --kd-top-k, --lora-r, --dsft-lr)
TOP_LEVEL = [f for f in RecoverConfig.model_fields if f not in ("kd", "lora", "sampling", "dsft")]
LORA_NUMBERS = ("r", "alpha", "dropout")
_SAMPLING_RENAMES = {"batch_size": "gen_batch_size"}  # --batch-size is the training batch


def _prefixed(section: str, model) -> dict[str, str]:
    return {f: f"{section}_{f}" for f in model.model_fields}


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
    add_config_flags(p, RecoverConfig, TOP_LEVEL)
    add_config_flags(p.add_argument_group("token KD"), KDConfig, KDConfig.model_fields,
                     renames=_prefixed("kd", KDConfig))
    g = p.add_argument_group("LoRA (default: full fine-tuning)")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters, merged on save")
    add_config_flags(g, LoraConfig, LORA_NUMBERS, renames=_prefixed("lora", LoraConfig))
    g.add_argument("--lora-target-modules", default=",".join(_LORA.target_modules),
                   help=field_help(LoraConfig, "target_modules") + ", comma-separated")
    add_config_flags(p.add_argument_group("pair sampling"), SamplingConfig, SamplingConfig.model_fields,
                     renames=_SAMPLING_RENAMES)
    add_config_flags(p.add_argument_group("dSFT stage (gives π_ref)"), DSFTConfig, DSFTConfig.model_fields,
                     renames=_prefixed("dsft", DSFTConfig))
    p.set_defaults(func=cmd_recover)


def config_from_args(args) -> RecoverConfig:
    """The RecoverConfig the flags describe (one-line DadpoError naming the flag on bad values)."""
    lora = None
    if args.lora:
        lora = {f: getattr(args, f"lora_{f}") for f in LORA_NUMBERS}
        lora["target_modules"] = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    return RecoverConfig.parse({
        **{f: getattr(args, f) for f in TOP_LEVEL}, "lora": lora,
        "kd": {f: getattr(args, f"kd_{f}") for f in KDConfig.model_fields},
        "sampling": {f: getattr(args, _SAMPLING_RENAMES.get(f, f)) for f in SamplingConfig.model_fields},
        "dsft": {f: getattr(args, f"dsft_{f}") for f in DSFTConfig.model_fields},
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
    from dadpo.distributed import is_main
    from dadpo.recover.pipeline import run_recover

    cfg = config_from_args(args)
    check_out_path(args.out, "--out", folder=True)
    with hold_output(args.out, "--out"):
        metrics = run_recover(args.student, args.teacher, args.prompts, args.out, cfg, overwrite=args.overwrite)
    if is_main():
        print(f"recovered model in {args.out}/model; metrics: {metrics}")
    return 0
