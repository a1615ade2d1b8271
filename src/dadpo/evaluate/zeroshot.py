"""LLM-Pruner's seven zero-shot tasks through lm-eval on an in-memory model.

Online, the standard lm-eval task names are used. Offline (`data_dir` given), each task's local files are
converted once into a uniform JSONL and a task YAML (`dataset_path: json`) that mirrors the standard
task's prompt, so `lm_eval.simple_evaluate` runs with no hub access.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from dadpo.errors import DadpoError
from dadpo.io import atomic_write_text

log = logging.getLogger(__name__)

#: tasks whose standard lm-eval config reports acc only (winogrande's acc_norm would divide by the length of
#: the two sentence prefixes, which means nothing; boolq's answers are the single tokens no/yes)
ACC_ONLY = ("boolq", "winogrande")
_ACC_NORM = "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")

#: the one zero-shot metric per task, LLM-Pruner's: acc_norm where the answers' lengths differ enough for
#: length normalisation to matter, acc elsewhere. report.md, its plots and `dadpo bench` all score with it.
TASK_METRIC = {"boolq": "acc", "piqa": "acc", "hellaswag": "acc_norm", "winogrande": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
#: normal quantile of a two-sided 95% interval: value ± Z95·SE
Z95 = 1.96


def zeroshot_summary(zs: dict) -> dict:
    """`run_zeroshot`'s results scored one way: each task's `TASK_METRIC` in % with its binomial standard
    error SE = sqrt(p(1−p)/n) over the n items scored, and the unweighted mean over tasks with the pooled
    SE = sqrt(Σ SE_t²)/T (tasks independent). Returns {"mean", "se", "tasks": {task: {"metric", "value",
    "se", "n"}}}. A task without its metric is left out; without n a task's SE (and so the mean's) is None.
    n is lm-eval's effective sample count (`run_zeroshot`'s "n"). At p = 0 or 1 the SE is 0 (the normal
    approximation's blind spot with few items), so read a perfect or null score on a small n with care."""
    tasks = {}
    for task, r in zs.items():
        metric = TASK_METRIC.get(task)
        if metric is None or r.get(metric) is None:
            continue
        p, n = r[metric], r.get("n")
        se = 100 * math.sqrt(p * (1 - p) / n) if n else None
        tasks[task] = {"metric": metric, "value": 100 * p, "se": se, "n": n}
    ses = [t["se"] for t in tasks.values()]
    return {
        "mean": sum(t["value"] for t in tasks.values()) / len(tasks) if tasks else None,
        "se": math.sqrt(sum(s * s for s in ses)) / len(ses) if ses and None not in ses else None,
        "tasks": tasks,
    }


def pm95(value: float | None, se: float | None) -> str:
    """"v ± h" with h the 95% half-width Z95·SE (just "v" when the SE is unknown, "–" without a value)."""
    if value is None:
        return "–"
    return f"{value:.1f}" + ("" if se is None else f" ± {Z95 * se:.1f}")


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _boolq(d: Path) -> Iterator[dict]:
    for r in _read_jsonl(d / "boolq/dev.jsonl"):
        yield {
            "query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            "choices": ["no", "yes"],
            "gold": int(r["answer"]),
        }


def _piqa(d: Path) -> Iterator[dict]:
    labels = (d / "piqa/valid-labels.lst").read_text().split()
    for r, label in zip(_read_jsonl(d / "piqa/valid.jsonl"), labels, strict=True):
        yield {
            "query": f"Question: {r['goal']}\nAnswer:",
            "choices": [r["sol1"], r["sol2"]],
            "gold": int(label),
        }


def _hellaswag(d: Path) -> Iterator[dict]:
    # llama.cpp layout: "label: ctx", gold index, 4 endings (already passed through lm-eval's preprocess)
    lines = (d / "hellaswag/hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    if len(lines) % 6:
        raise DadpoError(f"{d}/hellaswag/hellaswag_val_full.txt: {len(lines)} lines is not a multiple of 6")
    for k in range(0, len(lines), 6):
        yield {
            "query": lines[k].strip(),
            "choices": [e.strip() for e in lines[k + 2 : k + 6]],
            "gold": int(lines[k + 1]),
        }


def _winogrande(d: Path) -> Iterator[dict]:
    # lm-eval's partial scoring: the choices are the sentence prefixes, the target the shared continuation
    for r in _read_jsonl(d / "winogrande/dev.jsonl"):
        cut = r["sentence"].index("_")
        yield {
            "contexts": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
            "continuation": r["sentence"][cut + 1 :].strip(),
            "gold": int(r["answer"]) - 1,
        }


def _arc(name: str) -> Callable[[Path], Iterator[dict]]:
    def rows(d: Path) -> Iterator[dict]:
        for r in _read_jsonl(d / f"llm_foundry_icl_mc/{name}.jsonl"):  # query = "Question: ..."
            yield {"query": f"{r['query']}\nAnswer:", "choices": r["choices"], "gold": r["gold"]}

    return rows


def _openbookqa(d: Path) -> Iterator[dict]:
    for r in _read_jsonl(d / "openbookqa/test.jsonl"):
        labels = [c["label"] for c in r["question"]["choices"]]
        yield {
            "query": r["question"]["stem"],
            "choices": [c["text"] for c in r["question"]["choices"]],
            "gold": labels.index(r["answerKey"].strip()),
        }


#: task -> converter of the local files under a data dir into uniform rows
CONVERTERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "openbookqa": _openbookqa,
}

_MC_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
{acc_norm}metadata:
  version: 1.0
"""

# an integer doc_to_text selects the gold context (lm-eval's "multiple input" mode, as in winogrande)
_WINOGRANDE_YAML = (
    _MC_YAML.replace('"{{{{query}}}}"', '"{{{{gold}}}}"')
    .replace("doc_to_target: gold", 'doc_to_target: "{{{{continuation}}}}"')
    .replace("doc_to_choice: choices", "doc_to_choice: contexts")
)


def check_tasks(tasks: list[str]) -> list[str]:
    """Validate task names (the seven LLM-Pruner tasks)."""
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise DadpoError(f"unknown zero-shot task(s) {', '.join(bad)}; choose from {', '.join(TASKS)}")
    if not tasks:
        raise DadpoError("no zero-shot task given")
    return list(tasks)


def prepare_local_tasks(tasks: list[str], data_dir: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """Write uniform JSONL + YAML for `tasks` from `data_dir` into a folder of `work_dir` that belongs to
    this data dir (converted files are reused, so another data dir must not find them); return it."""
    data_dir = Path(data_dir)
    work_dir = Path(work_dir) / hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    work_dir.mkdir(parents=True, exist_ok=True)
    for task in check_tasks(tasks):
        data = work_dir / f"{task}.jsonl"
        if not data.is_file():
            try:
                rows = list(CONVERTERS[task](data_dir))
            except FileNotFoundError as e:
                raise DadpoError(f"zero-shot task {task}: data file missing under {data_dir}: {e.filename}") from None
            atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        template = _WINOGRANDE_YAML if task == "winogrande" else _MC_YAML
        norm = "" if task in ACC_ONLY else _ACC_NORM
        atomic_write_text(
            work_dir / f"dadpo_{task}.yaml", template.format(task=f"dadpo_{task}", data=data, acc_norm=norm)
        )
    return work_dir


def run_zeroshot(
    model,
    tok,
    tasks: list[str],
    *,
    data_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
) -> dict[str, dict]:
    """acc / acc_norm (with stderr and n) per task for an in-memory model; local files when `data_dir`.

    `cache`: path prefix of lm-eval's request cache (SQLite, `<cache>_rank0.db`) for *this* model: every
    scored request is committed as soon as it is computed, so a killed run resumes where it stopped and
    a rerun costs nothing. Keyed by request text only, so never share one cache between models."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise DadpoError(f"task limit must be ≥ 1, got {limit}")
    with tempfile.TemporaryDirectory(prefix="dadpo-lmeval-") as tmp:
        if data_dir is not None:
            folder = prepare_local_tasks(tasks, data_dir, work_dir or tmp)
            manager = TaskManager(include_path=str(folder), include_defaults=False)
            names = {f"dadpo_{t}": t for t in tasks}
        else:
            manager, names = TaskManager(), {t: t for t in tasks}
        padding_side = tok.padding_side
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
        try:
            out = simple_evaluate(
                model=lm,
                use_cache=None if cache is None else str(cache),
                tasks=list(names),
                task_manager=manager,
                limit=limit,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                verbosity="WARNING",
            )
        finally:
            tok.padding_side = padding_side
    return {
        names[name]: _metrics(res, out["n-samples"].get(name, {}))
        for name, res in out["results"].items()
        if name in names
    }


def _metrics(res: dict, n: dict) -> dict:
    row = {"n": n.get("effective")}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in res:
            row[metric] = res[f"{metric},none"]
            stderr = res.get(f"{metric}_stderr,none")
            row[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
    return row
