"""`dadpo evaluate`: compare students with their teacher (judge, ROUGE-L, lm-eval, perplexity)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dadpo.decoding import DecodingConfig
from dadpo.errors import DadpoError
from dadpo.io import check_out_path, hold_output, read_yaml
from dadpo.settings import add_config_flags, default_text, field_help, validated

_DESCRIPTION = """\
Evaluate one or more students against their teacher and write OUT/results.json, OUT/report.md and PNG
plots. Answers of every model to every evaluation set are generated once (greedy by default) and cached
under OUT/answers; each (student, teacher) answer pair is judged in both orders (an order-dependent
verdict is a tie) and verdicts are cached in OUT/verdicts.jsonl, so rerunning the same command after a
crash or an unreachable judge carries on where it stopped. Reports win/tie/loss, the preference rate
(win − loss), the adjusted win rate (win + ½ tie) with 95% bootstrap CIs, per-category rows and the
position-flip rate; ROUGE-L against reference answers (dolly, self_instruct, alpaca_eval, and a NAME=PATH
set of your own with a reference/output/response/answer field); optionally
LLM-Pruner's zero-shot tasks through lm-eval and WikiText-2/PTB perplexity."""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers) -> None:
    from dadpo.evaluate.config import EvalConfig, GenerationSettings, JudgeConfig
    from dadpo.evaluate.zeroshot import TASKS

    def described(model, field: str, flag_note: str = "", prefix: str = "") -> str:
        """The field's description and default, from the config (one definition per setting)."""
        text = f"{prefix}{model.model_fields[field].description}{flag_note} (default {default_text(model, field)})"
        return text.replace("%", "%%")  # argparse formats help with %

    p = subparsers.add_parser(
        "evaluate",
        help="compare students with the teacher (judge, lm-eval, perplexity)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--students",
        required=True,
        help="comma-separated students: model specs or NAME=SPEC (spec: hub id, directory, .gguf, alias)",
    )
    p.add_argument("--teacher", required=True, help="the teacher's model spec")
    p.add_argument("--out", required=True, help="output folder (cached answers and verdicts live here too)")
    p.add_argument(
        "--config",
        help="YAML with an EvalConfig (or a recipe with an `evaluate:` section); "
        "options given here override it",
    )
    p.add_argument(
        "--sets",
        help=described(EvalConfig, "sets", "; comma-separated, 'none' for none"),
    )
    p.add_argument("--limit", type=int, help=described(EvalConfig, "limit", " (none: all; dolly: its --dolly-heldout "
                                                                            "rows)"))
    p.add_argument("--dolly-heldout", type=int, help=described(EvalConfig, "dolly_heldout"))
    j = p.add_argument_group("judge")
    j.add_argument(
        "--judge",
        help=f"local:SPEC (an HF chat model, verdict from log-probs; default local:{default_text(JudgeConfig, 'model')}"
        "), openai:MODEL (an OpenAI-compatible endpoint), or none",
    )
    j.add_argument(
        "--judge-base-url",
        help=described(JudgeConfig, "base_url", ", e.g. http://127.0.0.1:8000/v1"),
    )
    j.add_argument(
        "--judge-api-key-env",
        help=described(JudgeConfig, "api_key_env", " ('none' on this command line); the key is sent to the judge "
                       "endpoint. Any name may be given here; a --config file may only name variables like "
                       "*_API_KEY or *_TOKEN"),
    )
    j.add_argument("--judge-concurrency", type=int, help=described(JudgeConfig, "concurrency"))
    j.add_argument("--judge-retries", type=int, help=described(JudgeConfig, "retries"))
    j.add_argument("--judge-timeout", type=float, help=described(JudgeConfig, "timeout"))
    j.add_argument("--judge-sets", type=lambda v: [x for x in v.split(",") if x],
                   help=described(JudgeConfig, "sets", "; comma-separated"))
    z = p.add_argument_group("zero-shot tasks and perplexity")
    z.add_argument("--tasks", help=f"lm-eval tasks, comma-separated, of: {', '.join(TASKS)}, or 'all' "
                   f"(default {default_text(EvalConfig, 'tasks')})")
    z.add_argument("--task-limit", type=int, help=described(EvalConfig, "task_limit"))
    z.add_argument("--ppl", help=described(EvalConfig, "ppl_corpora", prefix="perplexity corpora, comma-separated, "))
    z.add_argument("--seq-lens", help=described(EvalConfig, "seq_lens", ", comma-separated"))
    z.add_argument("--data-dir", help=field_help(EvalConfig, "data_dir"))
    g = p.add_argument_group("answer decoding (ROUGE-L over seeds: MiniLLM's protocol by default)")
    add_config_flags(g, GenerationSettings, DecodingConfig.model_fields, defaults=False)
    g.add_argument("--seeds", help=described(EvalConfig, "seeds", "; comma-separated"))
    c = p.add_argument_group("comparisons")
    c.add_argument("--baseline", help=EvalConfig.model_fields["baseline"].description)
    c.add_argument("--compare", help="more pairs A:B of model names, comma-separated, each reported as A − B "
                   f"with its paired 95%% CI (default {default_text(EvalConfig, 'compare')})")
    p.add_argument("--bootstrap", type=int, help=described(EvalConfig, "bootstrap"))
    p.add_argument("--seed", type=int, help=described(EvalConfig, "seed"))
    p.set_defaults(func=cmd_evaluate)


def _students(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in _csv(text):
        name, _, spec = item.partition("=") if "=" in item else (Path(item.rstrip("/")).name, "", item)
        if name in out:
            raise DadpoError(f"--students: two students are named {name!r}; use NAME=SPEC")
        out[name] = spec
    if not out:
        raise DadpoError("--students: give at least one student")
    return out


def build_config(args) -> dict:
    """EvalConfig fields from --config and the command line (the command line wins)."""
    from dadpo.evaluate.zeroshot import TASKS

    data: dict = {}
    if args.config:
        loaded = read_yaml(args.config, "--config") or {}
        section = loaded.get("evaluate", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(section, dict | None):
            raise DadpoError(f"--config {args.config}: expected a mapping of evaluate settings "
                             f"(or a recipe with an `evaluate:` section), got {type(section).__name__}")
        data = dict(section or {})
    if args.sets:
        data["sets"] = [] if args.sets == "none" else _csv(args.sets)
    if args.tasks:
        data["tasks"] = list(TASKS) if args.tasks == "all" else _csv(args.tasks)
    if args.ppl:
        data["ppl_corpora"] = _csv(args.ppl)
    if args.seq_lens:
        try:
            data["seq_lens"] = [int(x) for x in _csv(args.seq_lens)]
        except ValueError:
            raise DadpoError(f"--seq-lens: expected integers, got {args.seq_lens!r}") from None
    if args.seeds:
        try:
            data["seeds"] = [int(x) for x in _csv(args.seeds)]
        except ValueError:
            raise DadpoError(f"--seeds: expected integers, got {args.seeds!r}") from None
    if args.compare:
        pairs = [item.split(":") for item in _csv(args.compare)]
        if any(len(p) != 2 or not all(p) for p in pairs):
            raise DadpoError(f"--compare: expected pairs A:B of model names, got {args.compare!r}")
        data["compare"] = pairs
    for opt, field in (
        ("limit", "limit"),
        ("dolly_heldout", "dolly_heldout"),
        ("baseline", "baseline"),
        ("task_limit", "task_limit"),
        ("data_dir", "data_dir"),
        ("bootstrap", "bootstrap"),
        ("seed", "seed"),
    ):
        if getattr(args, opt) is not None:
            data[field] = getattr(args, opt)
    flags = {k: getattr(args, k) for k in DecodingConfig.model_fields}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags and isinstance(data.get("generation"), dict | None):  # anything else: EvalConfig names it
        data["generation"] = {**(data.get("generation") or {}), **flags}
    if args.judge == "none":
        data["judge"] = None
    elif isinstance(data.get("judge"), dict | None) and (args.judge or any(  # anything else: EvalConfig names it
        getattr(args, f"judge_{k}") is not None
        for k in ("base_url", "api_key_env", "concurrency", "retries", "timeout", "sets")
    )):
        judge = dict(data.get("judge") or {})
        if args.judge:
            kind, _, model = args.judge.partition(":")
            if kind not in ("local", "openai") or not model:
                raise DadpoError(f"--judge: expected local:SPEC, openai:MODEL or none, got {args.judge!r}")
            judge.update(kind=kind, model=model)
        for k in ("base_url", "api_key_env", "concurrency", "retries", "timeout", "sets"):
            if getattr(args, f"judge_{k}") is not None:
                judge[k] = getattr(args, f"judge_{k}")
        if judge.get("api_key_env") == "none":
            judge["api_key_env"] = None
        data["judge"] = judge
    return data


def cmd_evaluate(args) -> int:
    from dadpo.distributed import is_main
    from dadpo.evaluate.config import TYPED_KEY_ENV, EvalConfig
    from dadpo.evaluate.run import run_evaluate

    students = _students(args.students)
    # the key variable typed on this command line may have any name; one from --config may not
    config = validated(EvalConfig, build_config(args), context={TYPED_KEY_ENV: args.judge_api_key_env})
    check_out_path(args.out, "--out", folder=True)
    with hold_output(args.out, "--out"):
        results = run_evaluate(students, args.teacher, args.out, config)
    if not is_main():
        return 0
    for name, sets in results["pairwise"].items():
        for s, summ in sets.items():
            print(summary_line(name, s, summ["overall"], summ.get("validity")))
    print(f"wrote {Path(args.out) / 'report.md'} and results.json")
    return 0


def summary_line(name: str, set_name: str, o: dict, validity: dict | None = None) -> str:
    """One student's overall result on one set. With no valid verdict the rates are undefined (NaN, null
    in results.json) and read "n/a", not "+nan%". A judge that failed the validity check (`validity`,
    `stats.judge_validity`) gets its reason instead of rates: they measure the judge, not the student."""
    from dadpo.evaluate.stats import invalid_label

    if flag := invalid_label(validity):
        return (f"{name} vs teacher on {set_name}: preference n/a, {flag} "
                f"(n {o['n']}, invalid {o['invalid']}; its rates are kept in results.json)")

    def num(value: float | None, fmt: str = ".1f", unit: str = "") -> str:
        return format(value, fmt) + unit if value is not None and math.isfinite(value) else "n/a"

    ci = o["preference"]["ci95"]
    return (f"{name} vs teacher on {set_name}: preference {num(o['preference']['value'], '+.1f', '%')} "
            + (f"[{num(ci[0], '+.1f')}, {num(ci[1], '+.1f')}] " if ci else "")
            + f"(win {num(o['win']['value'])} / tie {num(o['tie']['value'])} / loss {num(o['loss']['value'])}, "
            f"flips {num(o['flip_rate'] or 0, unit='%')}, invalid {o['invalid']})")
