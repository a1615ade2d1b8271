"""Tokenised training examples and the padding-aware collator.

An example holds the prompt tokens and one or two responses (chosen = teacher, rejected = student).
The collator right-pads every sequence of the batch into one (2B or B, T) tensor — chosen rows first —
and labels only response tokens, so a single forward pass scores chosen and rejected together.
Cached per-example numbers (π_ref / π_te log-probs, teacher top-k) ride along as tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dadpo.data import chat_prompt
from dadpo.recover.losses import IGNORE_INDEX, per_token


def encode_turn(tok, messages: list[dict], response: str, max_prompt_len: int, max_response_len: int
                ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) in the chat template; the response keeps the template's end-of-turn."""
    prompt = chat_prompt(tok, messages)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    tail = full[len(prompt):] if full.startswith(prompt) else response + (tok.eos_token or "")
    p = tok(prompt, add_special_tokens=False).input_ids[-max_prompt_len:]
    r = tok(tail.rstrip("\n"), add_special_tokens=False).input_ids[:max_response_len]
    return p, r


def encode_example(tok, row_id: str, messages: list[dict], chosen: str, rejected: str | None,
                   max_prompt_len: int, max_response_len: int) -> dict:
    """One example: prompt ids + chosen ids (+ rejected ids) under `id`."""
    p, c = encode_turn(tok, messages, chosen, max_prompt_len, max_response_len)
    ex = {"id": row_id, "prompt_ids": p, "chosen_ids": c}
    if rejected is not None:
        ex["rejected_ids"] = encode_turn(tok, messages, rejected, max_prompt_len, max_response_len)[1]
    return ex


@dataclass
class PairCollator:
    """Right-pads prompt+response rows; labels are −100 on prompt and padding. Pads with `pad_id`."""

    pad_id: int
    responses: tuple[str, ...] = ("chosen", "rejected")

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in self.responses if f"{k}_ids" in examples[0]]
        seqs = [(ex["prompt_ids"], ex[f"{k}_ids"]) for k in keys for ex in examples]
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(seqs):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            labels[i, len(p):n] = torch.tensor(r)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in examples[0]:
            if key.endswith("_logps") and not key.startswith("topk"):
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        if "topk_logps" in examples[0]:  # per chosen response token: (N_tokens, k), rows in batch order
            batch["topk_logps"] = torch.cat([torch.as_tensor(ex["topk_logps"]) for ex in examples])
            batch["topk_ids"] = torch.cat([torch.as_tensor(ex["topk_ids"]) for ex in examples])
        return batch


def pair_logps(sums: torch.Tensor, counts: torch.Tensor, batch: dict, n: int, margin: str
               ) -> tuple[torch.Tensor, ...]:
    """(πθ chosen, πθ rejected, π_ref chosen, π_ref rejected, π_te chosen, π_te rejected) log-probs of a pair
    batch (chosen rows first), as sequence sums or, with `margin` "mean", per-token means of each response."""
    cached = [batch[f"{m}_{r}_logps"].to(sums.dtype) for m in ("ref", "teacher") for r in ("chosen", "rejected")]
    logps = [sums[:n], sums[n:], *cached]
    if margin == "mean":
        logps = [per_token(lp, counts[:n] if i % 2 == 0 else counts[n:]) for i, lp in enumerate(logps)]
    return tuple(logps)
