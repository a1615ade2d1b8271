"""The evaluate stage: judged preference vs the teacher, ROUGE-L, lm-eval zero-shot tasks, perplexity.

Piecewise use (a benchmark harness sharing work between students): `load_eval_set(s)`, `generate_answers`,
`make_judge` + `judge_student`, `model_metrics` (zero-shot + perplexity), `run_zeroshot`, `perplexity`.
"""

from dadpo.evaluate.answers import has_references, load_eval_set, load_eval_sets
from dadpo.evaluate.config import EvalConfig, GenerationSettings, JudgeConfig
from dadpo.evaluate.run import (
    generate_answers,
    judge_student,
    make_judge,
    model_metrics,
    run_evaluate,
)

__all__ = [
    "EvalConfig",
    "GenerationSettings",
    "JudgeConfig",
    "generate_answers",
    "has_references",
    "judge_student",
    "load_eval_set",
    "load_eval_sets",
    "make_judge",
    "model_metrics",
    "run_evaluate",
]
