"""`run_evaluate`: answers, pairwise judging vs the teacher, ROUGE-L, zero-shot tasks and perplexity for
several students, with every expensive piece cached under `out_dir` so a rerun or a crash never pays twice.

Layout of `out_dir`: answers/<model>/<set>.jsonl, verdicts.jsonl, metrics/<model>.json, results.json,
report.md, *.png.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from dadpo.data import data_folder
from dadpo.distributed import barrier, is_main, on_main
from dadpo.errors import DadpoError
from dadpo.evaluate.answers import (
    answer_config,
    generate_answers,
    load_eval_sets,
    model_slug,
    pair_items,
    spec_hash,
)
from dadpo.evaluate.backends import Judge, LocalJudge, OpenAIJudge
from dadpo.evaluate.config import EvalConfig, JudgeConfig
from dadpo.evaluate.judge import VerdictCache
from dadpo.evaluate.reference import diagnostics, paired_difference, prompt_scores, seed_average, seed_summary
from dadpo.evaluate.report import write_plots, write_report
from dadpo.evaluate.stats import calibrated_margin, combine, judge_validity, pairwise_summary, summarize
from dadpo.evaluate.zeroshot import run_zeroshot
from dadpo.generation import answer_key
from dadpo.io import atomic_write_json, atomic_write_text, read_jsonl
from dadpo.models import model_stamp
from dadpo.perplexity import load_corpus, perplexity
from dadpo.reuse import content_key

log = logging.getLogger(__name__)


def _data_dir(config: EvalConfig) -> str | None:
    folder = data_folder(config.data_dir)
    return str(folder) if folder else None


def model_metrics(
    model, tok, name: str, spec: str, out_dir: str | os.PathLike, config: EvalConfig, progress: bool = True
) -> dict:
    """Zero-shot accuracy and perplexity of a loaded model, cached in `out_dir/metrics/<model>.json` under a
    key of the settings and the model's weights (`model_stamp`)."""
    key = content_key({"model": model_stamp(spec), "tasks": config.tasks, "task_limit": config.task_limit,
                       "ppl_corpora": config.ppl_corpora, "seq_lens": config.seq_lens,
                       "ppl_max_windows": config.ppl_max_windows, "data_dir": _data_dir(config),
                       # only when set, so the metrics cached before the option existed stay valid
                       **({"ppl_window_stride": config.ppl_window_stride} if config.ppl_window_stride > 1 else {})})
    path = Path(out_dir) / "metrics" / f"{model_slug(name, spec)}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    metrics: dict = {"params": sum(p.numel() for p in model.parameters())}
    if config.tasks:
        metrics["zeroshot"] = run_zeroshot(
            model,
            tok,
            config.tasks,
            data_dir=_data_dir(config),
            work_dir=Path(out_dir) / "lm_eval_tasks",
            limit=config.task_limit,
            batch_size=config.task_batch_size,
            seed=config.seed,
            cache=path.with_name(f".{path.stem}.{key}.lm_eval"),  # a killed run resumes its zero-shot requests
        )
    rows = []
    for corpus in config.ppl_corpora:
        text = load_corpus(corpus, _data_dir(config))
        for seq_len in config.seq_lens:
            ppl = perplexity(model, tok, text, seq_len=seq_len, max_windows=config.ppl_max_windows,
                             window_stride=config.ppl_window_stride, progress=progress)
            rows.append({"corpus": corpus, **ppl})
    if rows:
        metrics["perplexity"] = rows
    atomic_write_json(path, {"key": key, "metrics": metrics})
    for stale in path.parent.glob(f".{path.stem}.*.lm_eval_rank*.db*"):  # its work is now in `path`
        stale.unlink(missing_ok=True)
    return metrics


def make_judge(cfg: JudgeConfig, loaded: dict | None = None) -> Judge:
    """A judge backend; a local judge reuses an already loaded (model, tok) from `loaded` by spec."""
    if cfg.kind == "openai":
        return OpenAIJudge(
            cfg.base_url,
            cfg.model,
            cfg.api_key_env,
            concurrency=cfg.concurrency,
            retries=cfg.retries,
            timeout=cfg.timeout,
            backoff=cfg.backoff,
            max_tokens=cfg.max_tokens,
        )
    from dadpo.models import load_model, model_fingerprint

    model, tok = (loaded or {}).get(cfg.model) or load_model(cfg.model)
    return LocalJudge(model, tok, cfg.model, batch_size=cfg.batch_size, fingerprint=model_fingerprint(cfg.model))


def judge_student(
    judge: Judge,
    cache: VerdictCache,
    student: dict[str, list[dict]],
    teacher: dict[str, list[dict]],
    config: EvalConfig,
    progress: bool = True,
) -> dict:
    """Judge one student's answers against the teacher's in both orders; summary per set.

    Each set's summary carries `validity` (`stats.judge_validity`): whether the judge's discrete verdicts
    depend on the answers at all. An invalid judge's rates stay in the summary, flagged; reports print the
    reason in their place. A local judge also gets `calibrated`, a different measurement: the sign of its
    log-prob margin with the student as A minus its margin with the student as B, which cancels a constant
    pull towards one position. It is kept when the verdicts are invalid, because position bias is exactly
    what it removes (a judge that always answers [[A]] may still move its log-probs with content), but the
    validity check does not cover it (it has no flips or letters to test), so reports label it as the
    log-prob reading of a judge whose verdicts failed the check, not as the judge's result."""
    out = {}
    for set_name, rows in student.items():
        triples = pair_items(set_name, rows, teacher[set_name])
        items = [it for _, a, b in triples for it in (a, b)]
        verdicts = judge.judge(items, cache, progress=progress)
        pairs = [
            {**meta, **combine(verdicts[2 * k]["verdict"], verdicts[2 * k + 1]["verdict"])}
            for k, (meta, _, _) in enumerate(triples)
        ]
        out[set_name] = pairwise_summary(pairs, samples=config.bootstrap, seed=config.seed)
        out[set_name]["invalid_verdicts"] = sum(v["verdict"] is None for v in verdicts)
        out[set_name]["validity"] = judge_validity(
            [(verdicts[2 * k]["verdict"], verdicts[2 * k + 1]["verdict"]) for k in range(len(triples))],
            identical=[a.conv_a == a.conv_b for _, a, _ in triples],
        )
        if all("logprobs" in v for v in verdicts):  # a local judge: add its position-calibrated reading
            margins = [
                calibrated_margin(verdicts[2 * k]["logprobs"], verdicts[2 * k + 1]["logprobs"])
                for k in range(len(triples))
            ]
            outcomes = [(m > 1e-6) - (m < -1e-6) for m in margins]
            out[set_name]["calibrated"] = summarize(outcomes, 0, 0, samples=config.bootstrap, seed=config.seed)
            out[set_name]["calibrated"]["mean_margin"] = sum(margins) / len(margins) if margins else None
    return out


def seed_caches(out_dir: Path, reuse: Sequence[str | os.PathLike], models: dict[str, str], config: EvalConfig
                ) -> None:
    """Copy into `out_dir` what sibling evaluate runs already made for the same model specs and settings
    (answers, zero-shot/perplexity metrics, judge verdicts), so `dadpo bench` does not redo `dadpo run`'s work.
    Only finished files are taken; answers must carry the same model stamp (spec and weights) and generation
    settings, and metrics are still checked against their cache key when used."""
    def ours(row: dict, stamp: dict) -> bool:
        """Whether an answer row has the key this run's answers of that model and seed will have."""
        theirs = row.get("generation") or {}
        if theirs.get("seed") not in config.seeds:
            return False
        mine = answer_config(config, theirs["seed"]).model_dump()
        if mine["precision"] == "auto":  # resolved per model when answering; checked there again
            mine["precision"] = theirs.get("precision")
        return answer_key(row) == answer_key({"model": stamp, "generation": mine})

    stamps = {spec: model_stamp(spec) for spec in set(models.values())}
    verdicts = VerdictCache(out_dir / "verdicts.jsonl")
    for other in map(Path, reuse):
        if not other.is_dir() or other.resolve() == out_dir.resolve():
            continue
        for name, spec in models.items():
            slug, digest = model_slug(name, spec), spec_hash(spec)
            for src in other.glob(f"answers/*-{digest}/*.jsonl"):
                dst = out_dir / "answers" / slug / src.name
                rows = read_jsonl(src)
                if not dst.exists() and all(ours(r, stamps[spec]) for r in rows):
                    atomic_write_text(dst, src.read_text())
            for src in other.glob(f"metrics/*-{digest}.json"):
                dst = out_dir / "metrics" / f"{slug}.json"
                if not dst.exists():
                    atomic_write_text(dst, src.read_text())
        if (other / "verdicts.jsonl").is_file():
            theirs = VerdictCache(other / "verdicts.jsonl").rows
            verdicts.add([row for key, row in theirs.items() if verdicts.get(key) is None])


def run_evaluate(
    students: dict[str, str],
    teacher: str,
    out_dir: str | os.PathLike,
    config: EvalConfig,
    *,
    progress: bool = True,
    reuse: Sequence[str | os.PathLike] = (),
    data_dir: str | None = None,
) -> dict:
    """Evaluate each student (name -> model spec) against `teacher`; write results.json, report.md, PNGs.

    `reuse`: other evaluate output dirs whose cached answers, metrics and verdicts of the same models are
    copied in first (see `seed_caches`). `data_dir`: the data folder when `config.data_dir` is unset (a
    recipe's top-level data_dir)."""
    from dadpo.models import load_model, load_tokenizer

    if not students:
        raise DadpoError("no student to evaluate")
    if "teacher" in students:
        raise DadpoError("a student may not be named 'teacher'")
    models = {"teacher": teacher, **students}
    pairs = comparison_pairs(config, list(students))
    for a, b in pairs:
        for n in (a, b):
            if n not in models:
                raise DadpoError(f"evaluate.baseline/compare: no model named {n!r} (models: {', '.join(models)})")
    out_dir = Path(out_dir)
    if data_dir and not config.data_dir:
        config = config.model_copy(update={"data_dir": data_dir})
    # cheap checks first: a missing API key, a bad spec or set fails now, not after an hour of work, and
    # before out_dir is made, so a refused run leaves no empty folder behind
    judge = make_judge(config.judge) if config.judge and config.judge.kind == "openai" and config.sets else None
    prompts = load_eval_sets(config)  # by display name: a built-in set's, or NAME of NAME=PATH
    local_judge = [config.judge.model] if config.judge and config.judge.kind == "local" and config.sets else []
    for spec in dict.fromkeys([teacher, *students.values(), *local_judge]):
        load_tokenizer(spec)  # resolves the spec and reads its config and tokenizer: seconds, no weights
    for corpus in config.ppl_corpora:
        load_corpus(corpus, _data_dir(config))
    on_main(lambda: (out_dir.mkdir(parents=True, exist_ok=True), seed_caches(out_dir, reuse, models, config)))
    answers, metrics = {}, {}
    keep_for_judge = {}
    for name, spec in models.items():
        log.info("evaluating %s (%s)", name, spec)
        model, tok = load_model(spec)
        # answers split across processes; zero-shot tasks and perplexity on the main process
        answers[name] = generate_answers(model, tok, name, spec, out_dir, config, prompts, progress)
        metrics[name] = on_main(lambda m=model, t=tok, n=name, s=spec: model_metrics(m, t, n, s, out_dir, config,
                                                                                     progress))
        if is_main() and config.judge and config.judge.kind == "local" and config.judge.model == spec:
            keep_for_judge[spec] = (model, tok)  # the judge is this model: keep it instead of reloading
        del model, tok  # one model in memory at a time
        gc.collect()
    if not is_main():  # judging and reporting are the main process's
        barrier()
        return json.loads((out_dir / "results.json").read_text())
    pairwise = {}
    if config.sets and config.judge:
        judge = judge or make_judge(config.judge, keep_for_judge)
        cache = VerdictCache(out_dir / "verdicts.jsonl")
        for name in students:
            pairwise[name] = judge_student(judge, cache, config.judged(first_seed(answers[name])),
                                           first_seed(answers["teacher"]), config, progress)
    blocks = {name: _model_block(metrics[name], answers[name], config) for name in models}
    results = {
        "teacher": {"spec": teacher, **blocks["teacher"]},
        "students": {n: {"spec": s, **blocks[n]} for n, s in students.items()},
        "judge": judge.id if pairwise else None,
        "pairwise": pairwise,
        "comparisons": compare(blocks, pairs, config),
        "config": config.model_dump(),
    }
    results["plots"] = write_plots(results, out_dir)
    atomic_write_json(out_dir / "results.json", results)
    write_report(results, out_dir)
    barrier()
    return results


def first_seed(answers: dict[str, dict[int, list[dict]]]) -> dict[str, list[dict]]:
    """Each set's answers under its first seed (what the judge reads)."""
    return {s: next(iter(by_seed.values())) for s, by_seed in answers.items()}


def comparison_pairs(config: EvalConfig, students: list[str]) -> list[tuple[str, str]]:
    """(a, b) pairs whose paired difference a − b is reported: every other model against the baseline
    (default: the first student, e.g. the unrecovered prune), then `config.compare`."""
    base = config.baseline or students[0]
    pairs = [(m, base) for m in ["teacher", *students] if m != base]
    return list(dict.fromkeys(pairs + [tuple(p) for p in config.compare]))


def compare(blocks: dict[str, dict], pairs: list[tuple[str, str]], config: EvalConfig) -> list[dict]:
    """Paired ROUGE-L differences per reference set, on seed-averaged per-prompt scores."""
    out = []
    for a, b in pairs:
        for s in blocks[a].get("rouge", {}):
            if s in blocks[b].get("rouge", {}):
                diff = paired_difference(blocks[a]["rouge"][s]["prompts"], blocks[b]["rouge"][s]["prompts"],
                                         samples=config.bootstrap, seed=config.seed)
                out.append({"set": s, "a": a, "b": b, **diff})
    return out


def _model_block(metrics: dict, answers: dict[str, dict[int, list[dict]]], config: EvalConfig) -> dict:
    """A model's results: its metrics, per reference set ROUGE-L over seeds (with the seed-averaged score of
    every prompt, for paired comparisons), and per set the degeneration diagnostics of all its answers."""
    rouge = {}
    for s, by_seed in answers.items():
        per_seed = {seed: scores for seed, rows in by_seed.items() if (scores := prompt_scores(rows))}
        if per_seed:
            summary = seed_summary(per_seed, samples=config.bootstrap, seed=config.seed)
            rouge[s] = {**summary, "prompts": seed_average(per_seed)}
    diag = {s: diagnostics([r for rows in by_seed.values() for r in rows]) for s, by_seed in answers.items()}
    return {**metrics, "rouge": rouge, "diagnostics": diag}
