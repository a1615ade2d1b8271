"""The evaluate stage: judged preference vs the teacher, ROUGE-L, lm-eval zero-shot tasks, perplexity.

Piecewise use (a benchmark harness sharing work between students): `load_eval_set(s)`, `generate_answers`,
`make_judge` + `judge_student`, `model_metrics` (zero-shot + perplexity), `run_zeroshot`;
perplexity itself is `dadpo.perplexity`, shared with the prune stage.
"""

from dadpo.evaluate.config import EvalConfig, GenerationSettings, JudgeConfig

#: attribute -> module, imported on first use: they pull in torch, `dadpo --help` should not
_LAZY = {"has_references": "answers", "load_eval_set": "answers", "load_eval_sets": "answers",
         "generate_answers": "run", "judge_student": "run", "make_judge": "run", "model_metrics": "run",
         "run_evaluate": "run"}

__all__ = ["EvalConfig", "GenerationSettings", "JudgeConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dadpo.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
