"""Instruction/prompt sets in the formats the field uses, normalised to one record type.

A source is a local file or directory, an alias (`dolly`, `vicuna_bench`, ...) or a hub dataset id.
Aliases resolve to `$DADPO_DATA_DIR/<local path>` when that exists, else to their hub dataset.

Every record has an id: the row's own (`id`, `question_id`), else its position in the set. Answers, caches
and pairings are keyed by it, so a set in which two rows share an id is refused, naming the id.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dadpo.errors import DadpoError
from dadpo.io import parse_jsonl, read_text

Message = dict[str, str]


@dataclass
class PromptRecord:
    """One prompt. `messages` are chat turns; user turns with no assistant reply after them are
    answered in order by generation (MT-bench's second turn follows the model's own first answer)."""

    id: str
    messages: list[Message]
    reference: str | None = None
    category: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def user_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "user"]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Alias:
    local: str  # path under $DADPO_DATA_DIR
    hub: str | None  # hub dataset id ("name" or "name:config"), None when the set lives only in a repo
    split: str = "train"


ALIASES: dict[str, Alias] = {
    "dolly": Alias("dolly15k/databricks-dolly-15k.jsonl", "databricks/databricks-dolly-15k"),
    "lima": Alias("lima/train.jsonl", "GAIR/lima"),
    "alpaca_demo": Alias("alpaca_en_demo/alpaca_en_demo.json", None),
    "vicuna_bench": Alias("vicuna_bench/question.jsonl", None),
    "mt_bench": Alias("mt_bench/question.jsonl", None),
    "self_instruct": Alias("self_instruct_user_oriented/user_oriented_instructions.jsonl", None),
    "alpaca_eval": Alias("alpaca_eval/gpt4_1106_preview_outputs.json", "tatsu-lab/alpaca_eval:alpaca_eval",
                         "eval"),
}


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def _dolly(row: dict, i: int) -> PromptRecord:
    ctx = (row.get("context") or "").strip()
    text = row["instruction"].strip() + (f"\n\n{ctx}" if ctx else "")
    return PromptRecord(str(row.get("id", i)), [_user(text)], row.get("response"), row.get("category"))


def _alpaca(row: dict, i: int) -> PromptRecord:
    inp = (row.get("input") or "").strip()
    text = row["instruction"].strip() + (f"\n\n{inp}" if inp else "")
    return PromptRecord(str(row.get("id", i)), [_user(text)], row.get("output"), row.get("category"))


def _alpaca_eval(row: dict, i: int) -> PromptRecord:
    return PromptRecord(str(i), [_user(row["instruction"])], row.get("output"), row.get("dataset"),
                        {"generator": row.get("generator")})


def _fastchat(row: dict, i: int) -> PromptRecord:
    refs = row.get("reference") or []
    return PromptRecord(str(row["question_id"]), [_user(t) for t in row["turns"]],
                        (refs[0] or None) if refs else None, row.get("category"), {"references": refs} if refs else {})


def _self_instruct(row: dict, i: int) -> PromptRecord:
    inst = (row.get("instances") or [{}])[0]
    inp = (inst.get("input") or "").strip()
    text = row["instruction"].strip() + (f"\n\n{inp}" if inp else "")
    return PromptRecord(str(row["id"]), [_user(text)], inst.get("output"), row.get("motivation_app"))


def _conversation(turns: list[tuple[str, str]], i: int, row: dict) -> PromptRecord:
    """Prompt = every turn up to the last user turn; reference = the assistant reply after it, if any."""
    msgs = [{"role": r, "content": c} for r, c in turns]
    last_user = max((k for k, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("conversation has no user turn")
    after = msgs[last_user + 1:]
    ref = after[0]["content"] if after and after[0]["role"] == "assistant" else None
    return PromptRecord(str(row.get("id", i)), msgs[: last_user + 1], ref, row.get("source") or row.get("category"))


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def _sharegpt(row: dict, i: int) -> PromptRecord:
    convo = row["conversations"]
    if convo and isinstance(convo[0], str):  # LIMA: plain strings, user/assistant alternating
        turns = [("user" if k % 2 == 0 else "assistant", t) for k, t in enumerate(convo)]
    else:
        turns = [(_SHAREGPT_ROLES[m.get("from", m.get("role"))], m.get("value", m.get("content"))) for m in convo]
    rec = _conversation(turns, i, row)
    if isinstance(row.get("chosen"), dict):  # preference pairs: keep both answers
        rec.reference = row["chosen"]["value"]
        rec.extra = {"chosen": row["chosen"]["value"], "rejected": row["rejected"]["value"]}
    return rec


def _messages(row: dict, i: int) -> PromptRecord:
    return _conversation([(m["role"], m["content"]) for m in row["messages"]], i, row)


#: fields a plain {"prompt": ...} row may carry its reference answer in, first present wins
REFERENCE_FIELDS = ("reference", "output", "response", "answer")


def _plain(row: dict, i: int) -> PromptRecord:
    ref = next((row[k] for k in REFERENCE_FIELDS if row.get(k)), None)
    return PromptRecord(str(row.get("id", i)), [_user(row["prompt"])], ref, row.get("category"))


#: format name -> (fields that identify it, normaliser); checked in this order
FORMATS: dict[str, tuple[tuple[str, ...], Callable[[dict, int], PromptRecord]]] = {
    "dolly": (("instruction", "context", "response"), _dolly),
    "self_instruct": (("instruction", "instances"), _self_instruct),
    "alpaca_eval": (("instruction", "output", "generator"), _alpaca_eval),
    "alpaca": (("instruction", "output"), _alpaca),
    "fastchat": (("question_id", "turns"), _fastchat),
    "sharegpt": (("conversations",), _sharegpt),
    "messages": (("messages",), _messages),
    "prompt": (("prompt",), _plain),
}


def detect_format(row: dict) -> str:
    for name, (keys, _) in FORMATS.items():
        if all(k in row for k in keys):
            return name
    raise DadpoError(f"unknown dataset format (fields: {', '.join(sorted(row))}); "
                     f"supported: {', '.join(FORMATS)}")


def normalise(rows: Iterable[dict], source: str, fmt: str | None = None) -> list[PromptRecord]:
    rows = list(rows)
    if not rows:
        raise DadpoError(f"dataset {source} is empty")
    if fmt is not None and fmt not in FORMATS:
        raise DadpoError(f"unknown dataset format {fmt!r}; supported: {', '.join(FORMATS)}")
    fmt = fmt or detect_format(rows[0])
    fn = FORMATS[fmt][1]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(_checked(fn(row, i)))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise DadpoError(f"dataset {source}: row {i} is not valid {fmt} ({type(e).__name__}: {e})") from None
    _check_unique_ids(out, source)
    return out


_ROLES = ("system", "user", "assistant")


def _checked(rec: PromptRecord) -> PromptRecord:
    """A record that generation and evaluation can use: turns of text in known roles, at least one from the
    user, and a text (or no) reference and category. Checked while the set loads, so a row of numbers or
    nulls is named by its row number instead of failing mid-generation."""
    for m in rec.messages:
        if m.get("role") not in _ROLES:
            raise ValueError(f"turn role {m.get('role')!r} is not one of {', '.join(_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"turn content must be text, got {type(m.get('content')).__name__}")
    if not any(m["role"] == "user" for m in rec.messages):
        raise ValueError("no user turn")
    for name in ("reference", "category"):
        if not isinstance(getattr(rec, name), str | None):
            raise ValueError(f"{name} must be text, got {type(getattr(rec, name)).__name__}")
    return rec


def _check_unique_ids(records: list[PromptRecord], source: str) -> None:
    """Refuse a set whose rows share an id: answers are keyed by id, so all but one prompt would be lost."""
    counts = Counter(r.id for r in records)
    repeated = [(i, n) for i, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(f"{i!r} ({n} rows)" for i, n in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise DadpoError(f"dataset {source}: duplicate prompt id {shown}{more}; every row needs its own id")


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json (array, or object with a list) file; a bad line is named by its line number."""
    text = read_text(path, "dataset")
    try:
        if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text):
            rows = list(parse_jsonl(text))
        else:
            data = json.loads(text) if text.strip() else []
            if isinstance(data, dict):  # e.g. {"data": [...]}: its first list
                data = next((v for v in data.values() if isinstance(v, list)), None)
            rows = data if isinstance(data, list) else None
    except json.JSONDecodeError as e:
        raise DadpoError(f"dataset {path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DadpoError(f"dataset {path}: JSON nested too deeply to read") from None
    if rows is None or not all(isinstance(r, dict) for r in rows):
        raise DadpoError(f"dataset {path} must hold a list of JSON objects")
    return rows


def _data_file(directory: Path) -> Path:
    if (directory / "question.jsonl").is_file():  # FastChat bench folders also hold reference answers
        return directory / "question.jsonl"
    files = sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".json"))
    if len(files) != 1:
        raise DadpoError(f"dataset directory {directory} must hold exactly one .jsonl/.json file "
                         f"(found {len(files)}); give the file path instead")
    return files[0]


def _load_hub(name: str, split: str) -> list[dict]:
    hub_id, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, config or None, split=split)
    except Exception as e:  # datasets raises many types (offline, missing, auth)
        raise DadpoError(f"cannot load dataset {name!r} from the hub: {str(e).splitlines()[0]}") from None
    return list(ds)


def data_folder(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data folder aliases resolve under: `data_dir` if given, else `$DADPO_DATA_DIR` (the one
    place that variable is read), else None (the hub). Settings pass `data_dir` down as an argument."""
    folder = data_dir or os.environ.get("DADPO_DATA_DIR")
    return Path(folder).expanduser().resolve() if folder else None


def load_prompts(source: str, *, fmt: str | None = None, split: str | None = None,
                 data_dir: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Load a prompt set from a local path, an alias (under `data_folder(data_dir)`, else its hub copy) or a
    hub id, normalised to `PromptRecord`s."""
    source = str(source)
    path = Path(source).expanduser()
    if source in ALIASES:
        alias = ALIASES[source]
        folder = data_folder(data_dir)
        if folder and (folder / alias.local).is_file():
            path = folder / alias.local
        elif alias.hub:
            return normalise(_load_hub(alias.hub, split or alias.split), source, fmt)
        else:
            raise DadpoError(f"dataset {source!r} has no hub copy: set DADPO_DATA_DIR to a folder with "
                             f"{alias.local}, or give the file path")
    elif not path.exists():
        looks_like_hub = source.count("/") == 1 and not source.startswith((".", "/", "~")) and not path.suffix
        if not looks_like_hub:
            raise DadpoError(f"dataset not found: {source} (a file, a directory, a hub id, or one of: "
                             f"{', '.join(ALIASES)})")
        return normalise(_load_hub(source, split or "train"), source, fmt)
    if path.is_dir():
        path = _data_file(path)
    return normalise(read_rows(path), str(path), fmt)


def prompt_text(record: PromptRecord) -> str:
    """A record's prompt as compared across sets: its user turns (Dolly's context included), casefolded,
    whitespace collapsed. Two sets share a prompt when these are equal, whatever ids the rows carry."""
    return " ".join(" ".join(record.user_turns).split()).casefold()


def shared_prompts(records: list[PromptRecord], others: list[PromptRecord]
                   ) -> list[tuple[PromptRecord, PromptRecord]]:
    """(record, other) for each of `records` whose `prompt_text` is also one of `others`'."""
    seen = {prompt_text(o): o for o in others}
    return [(r, seen[t]) for r in records if (t := prompt_text(r)) in seen]


def split_records(records: list[PromptRecord], eval_size: int | float, seed: int = 0
                  ) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Seeded, deterministic (train, eval) split; `eval_size` is a count or a fraction."""
    n_eval = int(round(eval_size * len(records))) if isinstance(eval_size, float) else int(eval_size)
    if not 0 <= n_eval <= len(records):
        raise DadpoError(f"eval_size {eval_size} does not fit a dataset of {len(records)} rows")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def chat_prompt(tokenizer, messages: list[Message]) -> str:
    """The prompt text for the next assistant turn, in the tokenizer's own chat template."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
