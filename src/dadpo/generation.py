"""Batched chat generation with crash-safe, resumable JSONL output.

Rows go to `OUT.part` one batch per single append+fsync; when every prompt is answered, `OUT` is written
atomically in prompt order and the part file removed. A rerun of the same command reads both, skips
answered ids and carries on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dadpo.data import PromptRecord, chat_prompt
from dadpo.errors import DadpoError
from dadpo.io import append_jsonl, atomic_write_text, read_jsonl, truncate_torn_tail
from dadpo.models import chat_end_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_p": 0 < self.top_p <= 1, "batch_size": self.batch_size >= 1}
        for name, ok in checks.items():
            if not ok:
                raise DadpoError(f"--{name.replace('_', '-')}: invalid value {getattr(self, name)}")


def _batch_seed(seed: int, first_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_id}".encode()).digest()[:4], "little")


@torch.inference_mode()
def generate_batch(model, tok, conversations: list[list[dict]], cfg: GenerationConfig) -> list[tuple[str, int, bool]]:
    """Answer the next assistant turn of each conversation: (text, new tokens, stopped at end token)."""
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
        results.append((tok.decode(toks, skip_special_tokens=True).strip(), len(toks), stop is not None))
    return results


def answer_records(model, tok, records: list[PromptRecord], cfg: GenerationConfig) -> list[dict]:
    """Answer every open user turn of each record, in order (turn 2 sees the model's own turn-1 answer)."""
    torch.manual_seed(_batch_seed(cfg.seed, records[0].id))
    convs = [[] for _ in records]
    answers: list[list[str]] = [[] for _ in records]
    n_tokens = [0] * len(records)
    finished = [True] * len(records)
    pending = [list(r.messages) for r in records]
    while any(pending):
        active = []
        for i, msgs in enumerate(pending):
            # move given turns across until the next user turn that has no reply yet
            while msgs:
                convs[i].append(msgs.pop(0))
                if convs[i][-1]["role"] == "user" and not (msgs and msgs[0]["role"] == "assistant"):
                    active.append(i)
                    break
        if not active:
            break
        for i, (text, n, stopped) in zip(active, generate_batch(model, tok, [convs[i] for i in active], cfg),
                                         strict=True):
            convs[i].append({"role": "assistant", "content": text})
            answers[i].append(text)
            n_tokens[i] += n
            finished[i] = finished[i] and stopped
    return [
        {"id": r.id, "category": r.category, "messages": c, "response": a[-1] if a else "", "responses": a,
         "reference": r.reference, "new_tokens": n, "finish_reason": "stop" if f else "length"}
        for r, c, a, n, f in zip(records, convs, answers, n_tokens, finished, strict=True)
    ]


def generate_to_file(model, tok, records: list[PromptRecord], cfg: GenerationConfig, out: str | os.PathLike,
                     *, model_name: str, overwrite: bool = False, replace_stale: bool = False,
                     progress: bool = True) -> list[dict]:
    """Answer `records` into JSONL `out`, resuming from what an earlier run of the same settings wrote.
    A file of other settings is an error, or with `replace_stale` (answers kept only as a cache) redone."""
    out = Path(out)
    part = out.with_name(out.name + ".part")
    stamp = {"model": model_name, "generation": asdict(cfg)}
    if overwrite:
        out.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    try:
        done = _existing_rows(out, part, stamp)
    except DadpoError:  # written with other settings
        if not replace_stale:
            raise
        log.warning("%s was written with other settings: answering again", out)
        out.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
        done = {}
    todo = [r for r in records if r.id not in done]
    if todo:
        if not part.exists():
            if out.exists():
                shutil.copyfile(out, part)
            else:
                part.parent.mkdir(parents=True, exist_ok=True)
                part.touch()
        # longest prompts first: similar lengths share a batch (less padding), and OOM shows up early
        todo.sort(key=lambda r: -sum(len(m["content"]) for m in r.messages))
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"generate {out.name}",
                   unit="prompt", disable=not progress)
        for start in range(0, len(todo), cfg.batch_size):
            rows = answer_records(model, tok, todo[start:start + cfg.batch_size], cfg)
            rows = [{**row, **stamp} for row in rows]
            append_jsonl(part, rows)
            done.update((row["id"], row) for row in rows)
            bar.update(len(rows))
        bar.close()
    rows = [done[r.id] for r in records]
    if part.exists():  # finished: the final file holds the rows in prompt order
        atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        part.unlink()
    return rows


def _existing_rows(out: Path, part: Path, stamp: dict) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for path in (out, part):
        if not path.exists():
            continue
        if path == part:
            truncate_torn_tail(part)
        for row in read_jsonl(path, drop_torn_tail=True):
            if {k: row.get(k) for k in stamp} != stamp:
                raise DadpoError(f"{out} was written with other settings ({row.get('model')}, "
                                 f"{row.get('generation')}); use --overwrite or another --out")
            rows[row["id"]] = row
    return rows
