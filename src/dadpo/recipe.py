"""The recipe YAML schema: one validated description of a prune → recover → evaluate run.

Everything is checked before any model loads. Errors are one line naming the YAML path
(`recover.beta2: must be > 0, got -1`); an unknown key gets the closest valid key suggested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dadpo.embedded import DEFAULT_MODEL
from dadpo.errors import DadpoError
from dadpo.evaluate.config import EvalConfig
from dadpo.io import read_yaml
from dadpo.prune import PruneConfig
from dadpo.recover.config import RecoverConfig
from dadpo.settings import error_line

PRUNE_THE_TEACHER = "prune"


class Recipe(BaseModel):
    """A whole run. `student: prune` (default) makes the student by pruning the teacher."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="run name, used in reports")
    output_dir: str = Field(..., min_length=1, description="every stage writes to <output_dir>/<stage>/")
    seed: int = Field(0, description="copied into each section that does not set its own seed")
    teacher: str = Field(DEFAULT_MODEL, min_length=1, description="model spec of the teacher")
    student: str = Field(PRUNE_THE_TEACHER, min_length=1,
                         description="model spec of the student, or `prune` to prune the teacher")
    prompts: str = Field("dolly", min_length=1, description="training prompt set for recover")
    data_dir: str | None = Field(None, description="local data folder for dataset aliases ($DADPO_DATA_DIR)")
    accelerate_config: str | None = Field(None, description="accelerate config for multi-GPU training")
    prune: PruneConfig | None = None
    recover: RecoverConfig | None = None
    evaluate: EvalConfig | None = None

    @field_validator("data_dir", "accelerate_config")
    @classmethod
    def _no_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> Recipe:
        if self.student == PRUNE_THE_TEACHER and self.prune is None:
            raise ValueError("prune: section missing, but student is `prune` (prune the teacher)")
        if self.student != PRUNE_THE_TEACHER and self.prune is not None:
            raise ValueError("student: a prune section needs `student: prune` (the teacher is what gets pruned)")
        if not (self.prune or self.recover or self.evaluate):
            raise ValueError("recover: nothing to do, give at least one of prune, recover, evaluate")
        return self

    @property
    def pruned(self) -> bool:
        return self.student == PRUNE_THE_TEACHER


def _set_path(data: dict, dotted: str, value: Any, flag: str) -> None:
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise DadpoError(f"{flag} {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str], flag: str = "--set") -> dict:
    """Apply `key.path=value` overrides; values are parsed as YAML (`0.1`, `true`, `[a, b]`). Errors name
    `flag` (the option the overrides came from)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not k for k in key.split(".")):
            raise DadpoError(f"{flag} {item!r}: expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_path(data, key.strip(), value, flag)
    return data


def _propagate_seed(data: dict) -> None:
    seed = data.get("seed", 0)
    for section in ("prune", "recover", "evaluate"):
        if isinstance(data.get(section), dict):
            data[section].setdefault("seed", seed)


def validate_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe; the first problem becomes a one-line DadpoError naming its YAML path."""
    if not isinstance(data, dict):
        raise DadpoError(f"{source}: the recipe must be a YAML mapping of keys, got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("seed"), int) and not isinstance(data.get("seed"), bool):
        _propagate_seed(data)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise DadpoError(f"{source}: {error_line(e, Recipe)}") from None
    except DadpoError as e:  # a section's own validator
        raise DadpoError(f"{source}: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe YAML file."""
    data = read_yaml(path, "recipe")
    if data is None:
        raise DadpoError(f"{path}: the recipe is empty")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return validate_recipe(data, str(path))
