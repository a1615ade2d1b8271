"""Pairwise LLM-as-judge: our prompt, verdict parsing, and a crash-safe verdict cache.

A judgement asks which of two answers (A, B) to the same user conversation is better, and reads back one
of the verdict tokens `[[A]]`, `[[B]]` or `[[C]]` (tie). Backends live in `dadpo.evaluate.backends`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dadpo.io import append_jsonl, read_jsonl, truncate_torn_tail

JUDGE_SYSTEM = (
    "You are a careful, impartial referee comparing two AI assistants. Both were given the same user "
    "request; read it, then read each assistant's reply and decide which one serves the user better. Weigh "
    "whether the reply does what was asked, is correct, is relevant and is useful; consider depth and "
    "clarity only after that. Where a reference answer is given, use it to check correctness. The order in "
    "which the two replies appear is random and says nothing about their quality: do not favour the first "
    "or the second. A longer reply is not a better reply for being longer. Ignore the assistants' names. "
    "Write at most a few sentences of comparison, then end with your decision in exactly this form: "
    "[[A]] if assistant A's reply is better, [[B]] if assistant B's reply is better, [[C]] if they are "
    "equally good or equally bad."
)

VERDICTS = ("A", "B", "C")
_VERDICT_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass(frozen=True)
class PairItem:
    """One judgement: the user turns with assistant A's and B's replies (each its own conversation)."""

    key: str  # stable id of the item, e.g. "vicuna_bench/12/t1/student-first"
    conv_a: list[dict]  # messages ending with assistant A's reply under judgement
    conv_b: list[dict]
    reference: str | None = None


def _render_conversation(label: str, conv: list[dict]) -> str:
    lines = []
    for m in conv:
        who = "User" if m["role"] == "user" else f"Assistant {label}"
        lines.append(f"### {who}:\n{m['content']}")
    return "\n\n".join(lines)


def judge_messages(item: PairItem) -> list[dict]:
    """The chat messages (system + user) that ask the judge for a verdict on `item`."""
    ref = f"[Reference answer]\n{item.reference}\n[End of reference answer]\n\n" if item.reference else ""
    if len(item.conv_a) <= 2:  # single turn: one question, two answers
        user = (
            f"[User request]\n{item.conv_a[0]['content']}\n[End of user request]\n\n{ref}"
            f"[Reply of assistant A]\n{item.conv_a[-1]['content']}\n[End of reply of assistant A]\n\n"
            f"[Reply of assistant B]\n{item.conv_b[-1]['content']}\n[End of reply of assistant B]"
        )
    else:  # multi-turn: each assistant's own conversation; the last reply is the one judged
        user = (
            f"Judge only the assistants' replies to the LAST user message.\n\n{ref}"
            f"[Conversation with assistant A]\n{_render_conversation('A', item.conv_a)}\n"
            f"[End of conversation with assistant A]\n\n"
            f"[Conversation with assistant B]\n{_render_conversation('B', item.conv_b)}\n"
            f"[End of conversation with assistant B]"
        )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> str | None:
    """The last `[[A]]`/`[[B]]`/`[[C]]` in a judge reply, or None when there is none (an invalid verdict)."""
    found = _VERDICT_RE.findall(reply or "")
    return found[-1] if found else None


def cache_key(judge_id: str, messages: list[dict]) -> str:
    """Content address of a judgement: the judge's identity plus the exact prompt it sees."""
    blob = json.dumps([judge_id, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class VerdictCache:
    """Append-only JSONL of finished judgements, keyed by `cache_key`; a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            truncate_torn_tail(self.path)
            self.rows = {r["key"]: r for r in read_jsonl(self.path, drop_torn_tail=True)}

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_jsonl(self.path, rows)
        self.rows.update((r["key"], r) for r in rows)
