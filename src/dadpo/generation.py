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
from dataclasses import dataclass
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

    def __init__(self, record: PromptRecord, seed: int):
        self.record = record
        self.run_seed = seed
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

    def seed(self) -> int:
        """The sampling seed of the turn being answered: the run's seed, the prompt id and the turn."""
        return request_seed(self.run_seed, self.record.id, len(self.answers))

    def row(self) -> dict:
        r = self.record
        return {"id": r.id, "category": r.category, "messages": self.messages,
                "response": self.answers[-1] if self.answers else "", "responses": self.answers,
                "reference": r.reference, "new_tokens": self.tokens,
                "finish_reason": "stop" if self.finished else "length"}


def iter_answers(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> Iterator[dict]:
    """Answer every open user turn of each record under `cfg.seed`; yield each record's row as soon as it is
    complete (in no fixed order). See `answer_stream`."""
    for _, row in answer_stream(model, tok, records, cfg):
        yield row


def answer_stream(model, tok, records: list[PromptRecord], cfg: GenerationConfig,
                  seeds: list[int] | None = None) -> Iterator[tuple[int, dict]]:
    """Answer every open user turn of each record, record k sampled under `seeds[k]` (default: `cfg.seed`
    for all); yield (k, its row) as soon as it is complete. Llama-family models run on the continuous-
    batching engine with `cfg.batch_size` slots, every record in one queue (the same prompt may come under
    several seeds); others on `model.generate`. A sampled answer depends only on (seed, prompt id, turn,
    settings), never on the other records."""
    cfg = resolved(cfg, model)
    seeds = [cfg.seed] * len(records) if seeds is None else seeds
    reason = unsupported(model)
    if reason:
        log.debug("model.generate path: %s", reason)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bfloat16"):
            yield from _hf_answers(model, tok, records, seeds, cfg)
    else:
        yield from _engine_answers(model, tok, records, seeds, cfg)


def resolved(cfg: GenerationConfig, model) -> GenerationConfig:
    """`cfg` with `precision: auto` replaced by what it means for `model` on this machine (what answer files
    are stamped with, so answers made in another arithmetic are never mixed in)."""
    return cfg.model_copy(update={"precision": resolve_precision(cfg.precision, model, cfg.temperature)})


def answer_records(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> list[dict]:
    """`iter_answers` as a list in the order of `records`."""
    rows = {row["id"]: row for row in iter_answers(model, tok, records, cfg)}
    return [rows[r.id] for r in records]


def _engine_answers(model, tok, records: list[PromptRecord], seeds: list[int], cfg: GenerationConfig
                    ) -> Iterator[tuple[int, dict]]:
    engine = Engine(model, chat_end_token_ids(tok), slots=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.temperature, top_p=cfg.top_p, bf16=cfg.precision == "bfloat16")
    dialogs = [_Dialog(r, s) for r, s in zip(records, seeds, strict=True)]

    def request(k: int, conversation: list[dict]) -> Request:
        ids = tok(chat_prompt(tok, conversation), add_special_tokens=False)["input_ids"]
        return Request(k, ids, dialogs[k].seed())

    queue: deque[Request] = deque()
    for k, d in enumerate(dialogs):
        conversation = d.next_turn()
        if conversation is None:
            yield k, d.row()
        else:
            queue.append(request(k, conversation))
    for done in engine.stream(queue):
        d = dialogs[done.key]
        d.add(_text(tok, done.tokens), len(done.tokens), done.stopped)
        conversation = d.next_turn()
        if conversation is None:
            yield done.key, d.row()
        else:
            queue.appendleft(request(done.key, conversation))  # finish started dialogs first


def _hf_answers(model, tok, records: list[PromptRecord], seeds: list[int], cfg: GenerationConfig
                ) -> Iterator[tuple[int, dict]]:
    """`model.generate` per batch of records and turn; sampled turns one at a time, each seeded by its own
    request seed so that the batch does not change the sample."""
    for start in range(0, len(records), cfg.batch_size):
        dialogs = [_Dialog(r, s) for r, s in zip(records[start:start + cfg.batch_size],
                                                 seeds[start:start + cfg.batch_size], strict=True)]
        turns = [(d, c) for d in dialogs if (c := d.next_turn()) is not None]
        while turns:
            if cfg.temperature > 0:
                answers = []
                for d, c in turns:
                    torch.manual_seed(d.seed())
                    answers += generate_batch(model, tok, [c], cfg)
            else:
                answers = generate_batch(model, tok, [c for _, c in turns], cfg)
            for (d, _), answer in zip(turns, answers, strict=True):
                d.add(*answer)
            turns = [(d, c) for d, _ in turns if (c := d.next_turn()) is not None]
        yield from ((start + i, d.row()) for i, d in enumerate(dialogs))


@dataclass(frozen=True)
class AnswerJob:
    """One answer file to make: `records` answered under `cfg` into JSONL `out`."""

    records: list[PromptRecord]
    cfg: GenerationConfig
    out: Path


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
    return generate_to_files(model, tok, [AnswerJob(records, cfg, Path(out))], model_name=model_name,
                             overwrite=overwrite, replace_stale=replace_stale, progress=progress)[0]


def generate_to_files(model, tok, jobs: list[AnswerJob], *, model_name: str, overwrite: bool = False,
                      replace_stale: bool = False, progress: bool = True) -> list[list[dict]]:
    """`generate_to_file` for several files whose settings differ at most in their seed (e.g. an evaluation's
    sets × sampling seeds), answered from one queue: the engine's batch stays full until the last file's
    last prompts instead of draining at the end of every file. On the engine every file gets the rows it
    would get alone; on `model.generate` (other architectures) greedy batches mix the files' prompts, and
    padding makes those answers depend on their batch anyway."""
    if len({json.dumps(j.cfg.model_dump(exclude={"seed"}), sort_keys=True) for j in jobs}) > 1:
        raise ValueError("generate_to_files: the jobs' generation settings differ in more than their seed")
    rank, world = rank_and_world()
    files = [_AnswerFile(job, resolved(job.cfg, model), model_name, rank, world) for job in jobs]
    for f in files:
        f.load(overwrite, replace_stale)
    # longest prompts first: rows of similar length decode together, and OOM shows up early
    todo = sorted(((f, r) for f in files for r in f.todo), key=lambda fr: -sum(len(m["content"])
                                                                                for m in fr[1].messages))
    if todo:
        total = sum(len(j.records) for j in jobs)
        name = jobs[0].out.name + (f" and {len(jobs) - 1} more" if len(jobs) > 1 else "")
        bar = tqdm(total=total, initial=total - len(todo), desc=f"generate {name}", unit="prompt",
                   disable=not progress or rank > 0)
        for f in {f for f, _ in todo}:
            f.open_part()
        answers = answer_stream(model, tok, [r for _, r in todo], files[0].cfg, [f.cfg.seed for f, _ in todo])
        for k, row in answers:
            todo[k][0].add(row)
            bar.update(1)
        bar.close()
    return [f.finish() for f in files]


class _AnswerFile:
    """One answer file while it is being made: what is already answered, what is left, its part file."""

    def __init__(self, job: AnswerJob, cfg: GenerationConfig, model_name: str, rank: int, world: int):
        self.records, self.out, self.cfg, self.world = job.records, Path(job.out), cfg, world
        self.part = self.out.with_name(self.out.name + (f".part.{rank}" if world > 1 else ".part"))
        self.stamp = {"model": model_name, "generation": cfg.model_dump()}
        self.shard = shard(job.records, rank, world)
        self.done: dict[str, dict] = {}
        self.todo: list[PromptRecord] = []

    def load(self, overwrite: bool, replace_stale: bool) -> None:
        """Read what an earlier run of the same settings answered (after discarding it, with `overwrite`)."""
        if overwrite:
            _discard_on_main(self.out)
        try:
            self.done = _existing_rows(self.out, self.part, self.stamp)
        except DadpoError:  # written with other settings
            if not replace_stale:
                raise
            log.warning("%s was written with other settings: answering again", self.out)
            _discard_on_main(self.out)
            self.done = {}
        self.todo = [r for r in self.shard if r.id not in self.done]

    def open_part(self) -> None:
        if self.part.exists():
            return
        if self.out.exists() and self.world == 1:
            shutil.copyfile(self.out, self.part)
        else:
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self.part.touch()

    def add(self, row: dict) -> None:
        row = {**row, **self.stamp}
        append_jsonl(self.part, [row])  # one fsync'd line per finished prompt: a kill loses nothing done
        self.done[row["id"]] = row

    def finish(self) -> list[dict]:
        """Write `OUT` in prompt order once every rank is done, remove the part files; every record's row."""
        barrier()
        if is_main() and _part_files(self.out):
            if self.world > 1:  # the other ranks' answers are in their part files
                self.done = _existing_rows(self.out, None, self.stamp)
            rows = [self.done[r.id] for r in self.records]
            atomic_write_text(self.out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            for path in _part_files(self.out):
                path.unlink()
        barrier()
        if self.world > 1:  # every rank returns every answer
            self.done = {row["id"]: row for row in read_jsonl(self.out)}
        return [self.done[r.id] for r in self.records]


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
