"""Chat generation for prompt sets, with crash-safe, resumable JSONL output.

Llama-family models decode on the continuous-batching engine (`dadpo.engine`); other models on
`model.generate`. Each finished prompt's row goes to `OUT.part` in one append+fsync; when every prompt is
answered, `OUT` is written atomically in prompt order and the part file removed. A rerun of the same
command reads both, skips answered ids and carries on; since a sampled answer depends only on the seed,
the prompt id and the settings, a resumed run gives the answers an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dadpo.data import PromptRecord, chat_prompt
from dadpo.decoding import GenerationConfig
from dadpo.distributed import barrier, is_main, rank_and_world, shard
from dadpo.engine import Engine, Request, request_seed, resolve_precision, unsupported
from dadpo.errors import DadpoError
from dadpo.io import append_jsonl, atomic_write_text, read_jsonl, truncate_torn_tail
from dadpo.models import chat_end_token_ids
from dadpo.reuse import content_key

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_batch(model, tok, conversations: list[list[dict]], cfg: GenerationConfig) -> list[tuple[str, int, bool]]:
    """Answer the next assistant turn of each conversation with `model.generate` on one left-padded batch:
    (text, new tokens, stopped at end token). The reference implementation, and the path for models the
    engine does not run; sampling uses the global torch generator."""
    prompts = [chat_prompt(tok, c) for c in conversations]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    end_ids = chat_end_token_ids(tok)
    sample = cfg.temperature > 0
    out = model.generate(
        **enc,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=None,
        eos_token_id=end_ids,
        pad_token_id=tok.pad_token_id,
    )
    new = out[:, enc["input_ids"].shape[1]:]
    results = []
    for row in new.tolist():
        stop = next((k for k, t in enumerate(row) if t in end_ids), None)
        toks = row if stop is None else row[:stop]
        results.append((_text(tok, toks), len(toks), stop is not None))
    return results


def _text(tok, tokens: list[int]) -> str:
    return tok.decode(tokens, skip_special_tokens=True).strip()


class _Dialog:
    """One record's conversation while it is being answered: given turns are moved across until the next
    user turn that has no reply yet, which is then the turn to answer (MT-bench's turn 2 follows the
    model's own turn-1 answer)."""

    def __init__(self, record: PromptRecord):
        self.record = record
        self.messages: list[dict] = []
        self.pending = list(record.messages)
        self.answers: list[str] = []
        self.tokens = 0
        self.finished = True

    def next_turn(self) -> list[dict] | None:
        """The conversation to answer next, or None when every user turn has its reply."""
        while self.pending:
            self.messages.append(self.pending.pop(0))
            if self.messages[-1]["role"] == "user" and not (self.pending and self.pending[0]["role"] == "assistant"):
                return self.messages
        return None

    def add(self, text: str, tokens: int, stopped: bool) -> None:
        self.messages.append({"role": "assistant", "content": text})
        self.answers.append(text)
        self.tokens += tokens
        self.finished = self.finished and stopped

    def seed(self, seed: int) -> int:
        """The sampling seed of the turn being answered: the run's seed, the prompt id and the turn."""
        return request_seed(seed, self.record.id, len(self.answers))

    def row(self) -> dict:
        r = self.record
        return {"id": r.id, "category": r.category, "messages": self.messages,
                "response": self.answers[-1] if self.answers else "", "responses": self.answers,
                "reference": r.reference, "new_tokens": self.tokens,
                "finish_reason": "stop" if self.finished else "length"}


def iter_answers(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> Iterator[dict]:
    """Answer every open user turn of each record; yield each record's row as soon as it is complete (in
    no fixed order). Llama-family models run on the continuous-batching engine with `cfg.batch_size`
    slots; others on `model.generate`. A sampled answer depends only on (seed, prompt id, turn, settings)."""
    cfg = resolved(cfg, model)
    reason = unsupported(model)
    if reason:
        log.debug("model.generate path: %s", reason)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            yield from _hf_answers(model, tok, records, cfg)
    else:
        yield from _engine_answers(model, tok, records, cfg)


def resolved(cfg: GenerationConfig, model) -> GenerationConfig:
    """`cfg` with `precision: auto` replaced by what it means for `model` on this machine (what answer files
    are stamped with, so answers made in another arithmetic are never mixed in)."""
    return cfg.model_copy(update={"precision": resolve_precision(cfg.precision, model, cfg.temperature)})


def answer_records(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> list[dict]:
    """`iter_answers` as a list in the order of `records`."""
    rows = {row["id"]: row for row in iter_answers(model, tok, records, cfg)}
    return [rows[r.id] for r in records]


def _engine_answers(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> Iterator[dict]:
    engine = Engine(model, chat_end_token_ids(tok), slots=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, bf16=cfg.precision == "bfloat16")
    dialogs = [_Dialog(r) for r in records]

    def request(k: int, conversation: list[dict]) -> Request:
        ids = tok(chat_prompt(tok, conversation), add_special_tokens=False)["input_ids"]
        return Request(k, ids, dialogs[k].seed(cfg.seed))

    queue: deque[Request] = deque()
    for k, d in enumerate(dialogs):
        conversation = d.next_turn()
        if conversation is None:
            yield d.row()
        else:
            queue.append(request(k, conversation))
    for done in engine.stream(queue):
        d = dialogs[done.key]
        d.add(_text(tok, done.tokens), len(done.tokens), done.stopped)
        conversation = d.next_turn()
        if conversation is None:
            yield d.row()
        else:
            queue.appendleft(request(done.key, conversation))  # finish started dialogs first


def _hf_answers(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> Iterator[dict]:
    """`model.generate` per batch of records and turn; sampled turns one at a time, each seeded by its own
    request seed so that the batch does not change the sample."""
    for start in range(0, len(records), cfg.batch_size):
        dialogs = [_Dialog(r) for r in records[start:start + cfg.batch_size]]
        turns = [(d, c) for d in dialogs if (c := d.next_turn()) is not None]
        while turns:
            if cfg.temperature > 0:
                answers = []
                for d, c in turns:
                    torch.manual_seed(d.seed(cfg.seed))
                    answers += generate_batch(model, tok, [c], cfg)
            else:
                answers = generate_batch(model, tok, [c for _, c in turns], cfg)
            for (d, _), answer in zip(turns, answers, strict=True):
                d.add(*answer)
            turns = [(d, c) for d, _ in turns if (c := d.next_turn()) is not None]
        yield from (d.row() for d in dialogs)


def generate_to_file(model, tok, records: list[PromptRecord], cfg: GenerationConfig, out: str | os.PathLike,
                     *, model_name: str, overwrite: bool = False, replace_stale: bool = False,
                     progress: bool = True) -> list[dict]:
    """Answer `records` into JSONL `out`, resuming from what an earlier run of the same settings wrote.
    A file of other settings is an error, or with `replace_stale` (answers kept only as a cache) redone.
    `overwrite` and `replace_stale` delete only answer files dadpo wrote (every row carries its stamp).

    In a process group (`dadpo.distributed`) every rank answers its share of the prompts into its own part
    file, `OUT.part.<rank>`; the main process then writes `OUT` in prompt order. Answers depend only on the
    seed, the prompt id and the settings, so any number of processes gives the same file, and a run killed
    with one number of processes resumes with another."""
    out = Path(out)
    rank, world = rank_and_world()
    part = out.with_name(out.name + (f".part.{rank}" if world > 1 else ".part"))
    cfg = resolved(cfg, model)
    stamp = {"model": model_name, "generation": cfg.model_dump()}
    if overwrite:
        _discard_on_main(out)
    try:
        done = _existing_rows(out, part, stamp)
    except DadpoError:  # written with other settings
        if not replace_stale:
            raise
        log.warning("%s was written with other settings: answering again", out)
        _discard_on_main(out)
        done = {}
    todo = [r for r in shard(records, rank, world) if r.id not in done]
    if todo:
        if not part.exists():
            if out.exists() and world == 1:
                shutil.copyfile(out, part)
            else:
                part.parent.mkdir(parents=True, exist_ok=True)
                part.touch()
        # longest prompts first: rows of similar length decode together, and OOM shows up early
        todo.sort(key=lambda r: -sum(len(m["content"]) for m in r.messages))
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"generate {out.name}",
                   unit="prompt", disable=not progress or rank > 0)
        for row in iter_answers(model, tok, todo, cfg):
            row = {**row, **stamp}
            append_jsonl(part, [row])  # one fsync'd line per finished prompt: a kill loses nothing done
            done[row["id"]] = row
            bar.update(1)
        bar.close()
    barrier()
    if is_main() and _part_files(out):  # finished: the final file holds the rows in prompt order
        if world > 1:  # the other ranks' answers are in their part files
            done = _existing_rows(out, None, stamp)
        rows = [done[r.id] for r in records]
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        for path in _part_files(out):
            path.unlink()
    barrier()
    if world > 1:  # every rank returns every answer
        done = {row["id"]: row for row in read_jsonl(out)}
    return [done[r.id] for r in records]


def _discard_on_main(out: Path) -> None:
    barrier()  # nobody is still reading the files
    if is_main():
        _discard_answers(out)
    barrier()


def _part_files(out: Path) -> list[Path]:
    """`out`'s part files: OUT.part (one process) and OUT.part.<rank> (one per process of a group)."""
    name = re.compile(re.escape(out.name) + r"\.part(\.\d+)?")
    return sorted(p for p in out.parent.iterdir() if name.fullmatch(p.name)) if out.parent.is_dir() else []


STAMP_KEYS = ("id", "model", "generation")


def answer_key(row: dict) -> str:
    """The content key of an answer: the model stamp (spec and weights) and the resolved decoding settings
    it was made with; rows of another key are never resumed from or reused."""
    return content_key({"model": row.get("model"), "generation": row.get("generation")})


def check_answers_out(out: str | os.PathLike) -> None:
    """Refuse an `out` (or its part file) that holds something other than answers dadpo wrote: it is never
    resumed from, overwritten or deleted. Cheap, so commands call it before loading a model."""
    out = Path(out)
    for path in (out, *_part_files(out)):
        if path.exists() and not _is_answer_file(path):
            raise DadpoError(f"--out {out}: {path} exists and is not an answer file written by dadpo; "
                             "dadpo neither resumes from nor replaces it")


def _discard_answers(out: Path) -> None:
    """Delete `out` and its part files, once proven to be answer files dadpo wrote."""
    check_answers_out(out)
    for path in (out, *_part_files(out)):
        path.unlink(missing_ok=True)


def _is_answer_file(path: Path) -> bool:
    try:
        rows = read_jsonl(path, drop_torn_tail=True)
    except (ValueError, UnicodeDecodeError):
        return False
    return all(isinstance(r, dict) and all(k in r for k in STAMP_KEYS) for r in rows)


def _existing_rows(out: Path, part: Path | None, stamp: dict) -> dict[str, dict]:
    """The answers in `out` and all its part files; a torn last line of this process's `part` is cut."""
    check_answers_out(out)
    rows: dict[str, dict] = {}
    for path in (out, *_part_files(out)):
        if not path.exists():
            continue
        if path == part:
            truncate_torn_tail(part)
        for row in read_jsonl(path, drop_torn_tail=True):
            if answer_key(row) != answer_key(stamp):
                raise DadpoError(f"{out} was written with other settings ({row.get('model')}, "
                                 f"{row.get('generation')}); use --overwrite or another --out")
            rows[row["id"]] = row
    return rows
