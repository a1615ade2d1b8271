"""How the pydantic configs reach users: a field's default and help for its command-line flag, and a failed
validation as one line naming the field — its YAML path in a recipe, or the flag that set it.

The configs (`PruneConfig`, `RecoverConfig`, `EvalConfig`, `DecodingConfig`, `Recipe`) are the one source
of every default, help text and check; the command lines and the recipe loader read them through here.
Torch-free: `dadpo --help` builds every parser with it.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from dadpo.errors import ConfigError, DadpoError

Namer = Callable[[str], str]


def field_default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].get_default(call_default_factory=True)


def field_help(model: type[BaseModel], field: str) -> str:
    """A flag's help: its config field's description (`%` escaped for argparse)."""
    return (model.model_fields[field].description or "").replace("%", "%%")


def default_text(model: type[BaseModel], field: str) -> str:
    """A field's default as its flag would be typed: lists comma-joined, None as "none"."""
    value = field_default(model, field)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def add_config_flags(group, model: type[BaseModel], fields: Iterable[str], *, renames: dict[str, str] | None = None,
                     defaults: bool = True, state_default: bool = False) -> None:
    """One flag per field (`top_p` → `--top-p`, or `renames[field]`), typed (Literal fields get choices) and
    helped from `model`. `defaults=False` leaves the flag None, for fields another source (a --config file)
    may set, and the help then states the config's default; `state_default` states it for parsers whose
    formatter does not."""
    for field in fields:
        kind = _flag_kind(model.model_fields[field].annotation)
        text = field_help(model, field)
        if state_default or not defaults:
            text += f" (default {default_text(model, field)})"
        dest = (renames or {}).get(field, field)
        group.add_argument(flag_name(dest), dest=dest, default=field_default(model, field) if defaults else None,
                           help=text, **kind)


def _flag_kind(ann) -> dict:
    """argparse keywords for a field of type `ann`: choices for a Literal, a --x/--no-x switch for a bool,
    the value type otherwise (`int | None` parses as int)."""
    if get_origin(ann) is Literal:
        return {"choices": get_args(ann)}
    if ann is bool:
        return {"action": argparse.BooleanOptionalAction}
    args = [a for a in get_args(ann) if a is not type(None)]
    ann = args[0] if len(args) == 1 else ann
    return {"type": ann} if ann in (int, float, str) else {}


def flag_name(path: str) -> str:
    """The flag of a config field path, by the commands' naming rule (`top_p` → `--top-p`)."""
    return "--" + path.replace("_", "-") if path else "the command line"


def validated(model: type[BaseModel], data: dict, name: Namer = lambda path: path or "config",
              context: dict | None = None):
    """`model` validated from `data`; a failure becomes one DadpoError line naming the field as `name(path)`."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise DadpoError(error_line(e, model, name)) from None


def error_line(e: ValidationError, root: type[BaseModel], name: Namer = lambda path: path) -> str:
    """The first problem of a validation error as one line (and how many more there are)."""
    errs = e.errors()
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return _describe(errs[0], root, name) + more


def as_flag_error(e: ConfigError, flags: dict[str, str]) -> DadpoError:
    """A library's ConfigError as the command line's: the field named by the flag that set it, where the
    command has one (`flags` maps a field path such as `prune.ratio` to its flag)."""
    return DadpoError(f"{flags[e.field]}: {e.message}") if e.field in flags else e


def _describe(err: dict, root: type[BaseModel], name: Namer) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))  # drop union-branch tags
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:  # a whole-config check
        return f"{name('')}: {msg}" if name("") else msg
    where = name(".".join(str(p) for p in loc))
    if err["type"] == "extra_forbidden":
        owner = _owner(root, loc)
        valid = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else (
            f"; valid keys: {', '.join(valid)}" if valid else "")
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    got = err.get("input")
    # pydantic's own messages ("Input should be ...") do not show the value; dadpo's validators
    # (type value_error) quote it themselves where it helps, so it is added only to the former
    quiet = isinstance(got, dict) or got is None or err["type"] == "value_error"
    return f"{where}: {msg}{'' if quiet else f' (got {got!r:.60})'}"


def _owner(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model that owns the key at `loc` (for suggesting the closest valid key)."""
    model: Any = root
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model if hasattr(model, "model_fields") else None
