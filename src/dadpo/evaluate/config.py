"""`EvalConfig`: everything the evaluate stage does, as one validated model (a recipe's `evaluate:` section).

Validators only check values; they never load models or touch the network."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dadpo.decoding import DecodingConfig, Temperature
from dadpo.evaluate.zeroshot import TASKS
from dadpo.perplexity import CORPORA

#: built-in evaluation prompt sets (aliases of `dadpo.data`); any other set is given as NAME=PATH
EVAL_SETS = ("dolly", "vicuna_bench", "mt_bench", "self_instruct", "alpaca_eval")
#: Dolly is a training set; its held-out evaluation part is the data folder's first rows, by default 80
#: (10 per category, see ../shared/data/README.md): `EvalConfig.dolly_heldout`
DOLLY_HELDOUT = 80
#: the NAME of a NAME=PATH set: it names the set in reports and its answer files (answers/<model>/<NAME>.jsonl)
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def split_set(entry: str) -> tuple[str, str | None]:
    """An `EvalConfig.sets` entry as (name, path): ("dolly", None) for a built-in set, ("mine", "x.jsonl")
    for `mine=x.jsonl`."""
    name, sep, path = entry.partition("=")
    return (name.strip(), path.strip()) if sep else (entry, None)

#: the environment variables a recipe or config file may name as the judge's API key: it is sent to a
#: `base_url` the file's author chose, and recipes are shared, so never e.g. HOME or AWS_SECRET_ACCESS_KEY
KEY_ENV_NAME = re.compile(r"[A-Za-z0-9_]+_(API_KEY|TOKEN)")
#: validation-context key for a variable the user named on the command line (`--judge-api-key-env`), which
#: may be any: `EvalConfig.model_validate(data, context={TYPED_KEY_ENV: name})`
TYPED_KEY_ENV = "typed_api_key_env"


class JudgeConfig(BaseModel):
    """Who judges: a local HF chat model (verdict from log-probs) or an OpenAI-compatible endpoint."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "openai"] = "local"
    model: str = Field("smollm2-135m-instruct", description="local: model spec; openai: model name")
    base_url: str = Field("https://api.openai.com/v1", description="openai: endpoint base URL (…/v1)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="openai: env var with the key; null = none")
    concurrency: int = Field(4, ge=1, description="openai: requests in flight")
    retries: int = Field(3, ge=0, description="openai: retries per request (exponential backoff)")
    timeout: float = Field(120.0, gt=0, description="openai: seconds per request")
    backoff: float = Field(1.0, ge=0, description="openai: first retry delay in seconds, doubling")
    max_tokens: int = Field(512, ge=1, description="openai: reply length cap")
    batch_size: int = Field(4, ge=1, description="local: judgements per forward pass")
    sets: list[str] | None = Field(
        None, description="names of the evaluation sets the judge compares, none = every set; e.g. only the "
        "sets without references, where ROUGE-L cannot tell models apart")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {v!r}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _key_env(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or KEY_ENV_NAME.fullmatch(v) or v == (info.context or {}).get(TYPED_KEY_ENV):
            return v
        raise ValueError(f"got {v!r}; a recipe or config may only name a variable like *_API_KEY or *_TOKEN as "
                         "the judge's key (it is sent to judge.base_url); name any other with --judge-api-key-env")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class GenerationSettings(DecodingConfig):
    """Answer decoding, by default MiniLLM's protocol: pure sampling (temperature 1, top-p 1), 256 new tokens;
    one set of answers per seed in `EvalConfig.seeds`. Temperature 0 is greedy (one set of answers)."""

    temperature: Temperature = 1.0


class EvalConfig(BaseModel):
    """The evaluate stage's settings."""

    model_config = ConfigDict(extra="forbid")

    sets: list[str] = Field(
        default_factory=lambda: ["dolly", "vicuna_bench"],
        description=f"of {', '.join(EVAL_SETS)}, or NAME=PATH: a prompt file or folder of your own (any format "
        "dadpo reads; a reference/output/response/answer field gives ROUGE-L), reported as NAME",
    )
    dolly_heldout: int = Field(
        DOLLY_HELDOUT, ge=1,
        description="the dolly set is the Dolly file's first N rows (the first 80: 10 per category); these rows "
        "must never be trained on (a recipe whose prune calibration or recover training shares a prompt with "
        "an evaluation set is refused). More, e.g. 300, give tighter CIs",
    )
    limit: int | None = Field(None, ge=1, description="first N prompts of each set")
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    judge: JudgeConfig | None = Field(default_factory=JudgeConfig, description="null = no pairwise judging")
    tasks: list[str] = Field(default_factory=list, description=f"zero-shot tasks of {', '.join(TASKS)}")
    task_limit: int | None = Field(None, ge=1, description="items per zero-shot task; none = the full split")
    task_batch_size: int = Field(16, ge=1)
    data_dir: str | None = Field(
        None,
        description="local data folder for evaluation sets, tasks and corpora ($DADPO_DATA_DIR when unset; "
        "the hub when neither)",
    )
    ppl_corpora: list[str] = Field(default_factory=list, description=f"of {', '.join(CORPORA)} or text files")
    seq_lens: list[int] = Field(default_factory=lambda: [128], description="perplexity window lengths")
    ppl_max_windows: int | None = Field(None, ge=1, description="perplexity on the first N windows (None = all)")
    ppl_window_stride: int = Field(1, ge=1, description="score every k-th window of the whole text (1 = every "
                                   "window; k > 1 = a k-times cheaper proxy that samples all of the text)")
    seeds: list[int] = Field(
        default_factory=lambda: [10, 20, 30],
        description="sampling seeds: sets with references are answered once per seed and ROUGE-L is averaged "
                    "over them; other sets (and the judge) use the first seed's answers",
    )
    baseline: str | None = Field(
        None, description="the model every other one is compared with (paired CIs); default: the first student")
    compare: list[tuple[str, str]] = Field(
        default_factory=list, description="more pairs [a, b] of model names to compare (a − b, paired CI)")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: int = Field(0, description="seed of the bootstrap resampling")

    @field_validator("sets")
    @classmethod
    def _sets(cls, v: list[str]) -> list[str]:
        v = list(dict.fromkeys(v))
        bad = [s for s in v if "=" not in s and s not in EVAL_SETS]
        if bad:
            raise ValueError(f"unknown {', '.join(bad)} (evaluation sets are {', '.join(EVAL_SETS)}, "
                             "or NAME=PATH for a prompt file of your own)")
        seen: set[str] = set()
        for entry in v:
            name, path = split_set(entry)
            if path is not None:
                if not SET_NAME.fullmatch(name):
                    raise ValueError(f"{entry!r}: the NAME of NAME=PATH must be letters, digits, _ or - (at most "
                                     "64, starting with a letter or digit); it names the set's answer files")
                if name in EVAL_SETS:
                    raise ValueError(f"{entry!r}: {name} is a built-in set; give your set another NAME")
                if not path:
                    raise ValueError(f"{entry!r}: give the PATH of NAME=PATH")
            if name in seen:
                raise ValueError(f"two evaluation sets are named {name}; give each its own NAME")
            seen.add(name)
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated seed in {v}")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown {', '.join(bad)} (zero-shot tasks are {', '.join(TASKS)})")
        return list(dict.fromkeys(v))

    @field_validator("seq_lens")
    @classmethod
    def _seq_lens(cls, v: list[int]) -> list[int]:
        if any(s < 2 for s in v):
            raise ValueError(f"every window length must be ≥ 2, got {v}")
        return v

    def answer_seeds(self, has_references: bool) -> list[int]:
        """The seeds a set is answered with: all of `seeds` for a set with references when sampling; only the
        first otherwise (greedy answers do not depend on the seed; the judge reads one set of answers)."""
        return list(self.seeds) if has_references and self.generation.temperature > 0 else self.seeds[:1]

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalConfig:
        if not (self.sets or self.tasks or self.ppl_corpora):
            raise ValueError("nothing to evaluate: give sets, tasks or ppl_corpora")
        if self.judge and self.judge.sets is not None:
            names = [split_set(s)[0] for s in self.sets]
            unknown = [s for s in self.judge.sets if s not in names]
            if unknown or not self.judge.sets:
                raise ValueError(f"judge.sets: {', '.join(unknown) or '(empty)'} not among the evaluation sets "
                                 f"({', '.join(names)}); give a subset of them, or judge: null for no judge")
        return self

    def judged(self, answers: dict) -> dict:
        """The part of `answers` (set name → …) the judge compares: `judge.sets`, or every set."""
        keep = self.judge.sets if self.judge and self.judge.sets is not None else list(answers)
        return {name: rows for name, rows in answers.items() if name in keep}
