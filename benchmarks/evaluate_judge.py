"""Benchmark: pairwise judging with a local judge, sharing the teacher's answers between comparisons.

Comparisons (each judged in both orders; all cached under --out, so reruns and added students are cheap):
  * teacher vs teacher, greedy: identical answers, so every verdict is a tie by construction and the
    flip rate measures the judge's pure position bias;
  * teacher vs teacher, sampled (seed 0 vs seed 1 at --temperature): same model, different answers, so
    the preference rate's CI should contain 0;
  * each --student (greedy) vs the teacher (greedy).

    python benchmarks/evaluate_judge.py --out /tmp/judge --limit 80 --max-new-tokens 128 \
        --student prune20=/tmp/dadpo-shared/smollm2-prune20
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DADPO_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

from dadpo.evaluate import EvalConfig, generate_answers, judge_student, load_eval_set  # noqa: E402
from dadpo.evaluate.backends import LocalJudge  # noqa: E402
from dadpo.evaluate.judge import VerdictCache  # noqa: E402
from dadpo.evaluate.stats import invalid_label  # noqa: E402
from dadpo.io import atomic_write_json  # noqa: E402
from dadpo.models import load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher, also the judge")
    p.add_argument("--student", action="append", default=[], help="NAME=SPEC, repeatable")
    p.add_argument("--sets", default="vicuna_bench")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="for the sampled teacher-vs-teacher pair")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    base = {
        "sets": args.sets.split(","),
        "limit": args.limit,
        "bootstrap": 2000,
        "generation": {"max_new_tokens": args.max_new_tokens, "batch_size": 8},
    }
    greedy = EvalConfig.model_validate(base)
    prompts = {s: load_eval_set(s, args.limit) for s in greedy.sets}

    def sampled(seed: int) -> EvalConfig:
        gen = {**base["generation"], "temperature": args.temperature, "top_p": 0.95, "seed": seed}
        return EvalConfig.model_validate({**base, "generation": gen})

    t0 = time.perf_counter()
    model, tok = load_model(args.teacher)
    answers = {
        "teacher": generate_answers(model, tok, "teacher", args.teacher, out, greedy, prompts),
        "teacher-sampled-s0": generate_answers(model, tok, "teacher-s0", args.teacher, out, sampled(0), prompts),
        "teacher-sampled-s1": generate_answers(model, tok, "teacher-s1", args.teacher, out, sampled(1), prompts),
    }
    t_gen = time.perf_counter() - t0
    judge = LocalJudge(model, tok, args.teacher)
    cache = VerdictCache(out / "verdicts.jsonl")
    results = {"judge": judge.id, "config": greedy.model_dump(), "comparisons": {}}
    pairs = [
        ("teacher vs teacher (greedy, identical answers)", "teacher", "teacher"),
        ("teacher s1 vs teacher s0 (sampled)", "teacher-sampled-s1", "teacher-sampled-s0"),
    ]
    t1 = time.perf_counter()
    for label, student, reference in pairs:
        results["comparisons"][label] = judge_student(judge, cache, answers[student], answers[reference], greedy)
    for item in args.student:
        name, _, spec = item.partition("=")
        s_model, s_tok = load_model(spec)
        ans = generate_answers(s_model, s_tok, name, spec, out, greedy, prompts)
        del s_model
        label = f"{name} vs teacher (greedy)"
        results["comparisons"][label] = judge_student(judge, cache, ans, answers["teacher"], greedy)
    results["wall_s"] = {
        "teacher_generation": round(t_gen, 1),
        "judging_and_students": round(time.perf_counter() - t1, 1),
    }
    atomic_write_json(out / "judge_benchmark.json", results)
    for label, sets in results["comparisons"].items():
        for s, summ in sets.items():
            o = summ["overall"]
            lo, hi = o["preference"]["ci95"]
            print(
                f"{label} on {s}: n={o['n']} win {o['win']['value']:.1f} tie {o['tie']['value']:.1f} "
                f"loss {o['loss']['value']:.1f} preference {o['preference']['value']:+.1f} [{lo:+.1f}, {hi:+.1f}] "
                f"adjusted win {o['adjusted_win']['value']:.1f} flips {o['flip_rate']:.1f}% invalid {o['invalid']}"
            )
            if flag := invalid_label(summ.get("validity")):
                print(f"    {flag}: the rates above measure the judge, not the answers")
            if "calibrated" in summ:
                c = summ["calibrated"]
                lo, hi = c["preference"]["ci95"]
                print(
                    f"    position-calibrated log-prob reading: win {c['win']['value']:.1f} loss "
                    f"{c['loss']['value']:.1f} preference {c['preference']['value']:+.1f} [{lo:+.1f}, {hi:+.1f}] "
                    f"mean margin {c['mean_margin']:+.3f}"
                )
    print("wall", results["wall_s"])


if __name__ == "__main__":
    main()
