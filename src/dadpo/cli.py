"""The `dadpo` command line: one subcommand per job, `--help` at every level."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dadpo.distributed import init_from_env
from dadpo.errors import DadpoError


def one_line(text: str) -> str:
    """`text` as one line: the line breaks a path or value typed by the user may hold are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="hub id, local directory, .gguf file or alias (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default float32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off)")


#: modules with `register(subparsers)`: each stage's commands, after `generate`
STAGE_CLIS = ("dadpo.prune.cli", "dadpo.recover.cli", "dadpo.evaluate.cli", "dadpo.pipeline_cli", "dadpo.export")


def build_parser() -> argparse.ArgumentParser:
    from dadpo import __version__
    from dadpo.decoding import GenerationConfig
    from dadpo.embedded import DEFAULT_MODEL
    from dadpo.settings import add_config_flags

    parser = _Parser(prog="dadpo", description=(
        "Prune a chat LLM, recover it by distillation from its teacher (daDPO and baselines), "
        "and evaluate it against the teacher."))
    parser.add_argument("--version", action="version", version=f"dadpo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="answer a prompt set with a model (batched, resumable JSONL)",
                       description="Answer every prompt of a prompt set with a chat model. Output rows are "
                       "appended per batch to OUT.part and renamed to OUT at the end; rerunning the same "
                       "command after an interruption resumes where it stopped. Under `torchrun "
                       "--nproc_per_node N -m dadpo generate …` (or accelerate launch) each process answers "
                       "every N-th prompt into OUT.part.<rank> and the first writes OUT: the same file as one "
                       "process writes, since an answer depends only on the seed, the prompt id and the "
                       "settings.")
    add_model_args(g, DEFAULT_MODEL)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompt set: file, directory, alias (dolly, vicuna_bench, mt_bench, "
                     "self_instruct, alpaca_eval, lima, alpaca_demo) or hub id")
    src.add_argument("--prompt", action="append", help="a single prompt (repeatable); answers go to stdout")
    g.add_argument("--format", help="dataset format (default: detected from the fields)")
    g.add_argument("--limit", type=int, help="answer only the first N prompts")
    g.add_argument("--out", help="output JSONL (required with --prompts)")
    g.add_argument("--overwrite", action="store_true", help="discard an existing --out instead of resuming")
    add_config_flags(g.add_argument_group("decoding"), GenerationConfig, GenerationConfig.model_fields,
                     state_default=True)
    g.set_defaults(func=cmd_generate)

    for module in STAGE_CLIS:
        importlib.import_module(module).register(sub)
    return parser


def cmd_generate(args) -> int:
    from dadpo.data import PromptRecord, load_prompts
    from dadpo.decoding import GenerationConfig
    from dadpo.distributed import rank_and_world
    from dadpo.generation import check_answers_out, generate_to_file
    from dadpo.io import check_out_path, hold_output
    from dadpo.models import load_model, model_stamp, resolve_model
    from dadpo.settings import flag_name, validated

    cfg = validated(GenerationConfig, {k: getattr(args, k) for k in GenerationConfig.model_fields}, flag_name)
    if args.prompts:
        if not args.out:
            raise DadpoError("--out is required with --prompts")
        if args.limit is not None and args.limit < 1:
            raise DadpoError(f"--limit: must be ≥ 1, got {args.limit}")
        records = load_prompts(args.prompts, fmt=args.format)[: args.limit]
        check_out_path(args.out, "--out", folder=False, replaced=True)  # OUT.part and OUT's temp go beside it
        check_answers_out(args.out)
    else:
        records = [PromptRecord(str(i), [{"role": "user", "content": p}]) for i, p in enumerate(args.prompt)]
    resolve_model(args.model)  # fail on a bad spec before any heavy work
    rank, world = rank_and_world()
    if world > 1:
        logging.getLogger("dadpo").info("answering %d prompts across %d processes", len(records), world)
    if args.prompt:
        from dadpo.generation import answer_records

        model, tok = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        rows = answer_records(model, tok, records, cfg)
        for row in rows if rank == 0 else []:
            print(row["response"] + "\n")
        return 0
    with hold_output(args.out, "--out"):
        model, tok = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        rows = generate_to_file(model, tok, records, cfg, args.out, model_name=model_stamp(args.model),
                                overwrite=args.overwrite)
    n_tok = sum(r["new_tokens"] for r in rows)
    if rank == 0:
        print(f"wrote {len(rows)} answers ({n_tok} new tokens) to {args.out}")
    return 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning() if verbose else hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        init_from_env()  # under torchrun / accelerate launch: join the process group (each command splits its work)
        return args.func(args) or 0
    except DadpoError as e:
        print(f"dadpo {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dadpo {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
