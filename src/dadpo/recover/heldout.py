"""Held-out metrics of a recover run on prompts it never trains on: teacher-response NLL, and for
preference methods the pairs' margins, accuracies and teacher-term statistics."""

from __future__ import annotations

import torch

from dadpo.data import PromptRecord
from dadpo.distributed import unshard
from dadpo.models import load_model
from dadpo.recover.config import RecoverConfig
from dadpo.recover.forward import response_logps
from dadpo.recover.losses import dadpo_margins, teacher_term_stats
from dadpo.recover.pairs import encode_example, pair_logps
from dadpo.recover.scoring import autocast, batches


@torch.no_grad()
def heldout_prompt_nll(spec: str, records: list[PromptRecord], teacher_rows: dict[str, str],
                       cfg: RecoverConfig) -> dict[str, tuple[float, int]]:
    """{prompt id: (summed NLL, tokens)} of each held-out teacher response under model `spec`, in `records`'
    order whatever the number of processes (paired comparisons between models need them per prompt)."""
    model, tok = load_model(spec)
    examples = [encode_example(tok, r.id, r.messages, teacher_rows[r.id], None, cfg.max_prompt_len,
                               cfg.max_response_len) for r in records]
    per_chunk = []
    for chunk, batch in batches(examples, cfg.batch_size, tok.pad_token_id, "held-out NLL", model.device,
                                cfg.group_by_length):
        out = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        per_chunk.append([(ex["id"], -s, n) for ex, s, n in zip(chunk, out.sums.tolist(), out.counts.tolist(),
                                                                 strict=True)])
    nll = {i: (s, n) for rows in unshard(per_chunk) for i, s, n in rows}
    return {r.id: nll[r.id] for r in records}


def heldout_nll(spec: str, records: list[PromptRecord], teacher_rows: dict[str, str], cfg: RecoverConfig) -> dict:
    """Per-token NLL of the held-out teacher responses under model `spec`, pooled over every token."""
    if not records:
        return {}
    per_prompt = heldout_prompt_nll(spec, records, teacher_rows, cfg).values()
    count = sum(n for _, n in per_prompt)
    return {"nll": sum(s for s, _ in per_prompt) / count, "tokens": count}


@torch.no_grad()
def heldout_pairs(spec: str, examples: list[dict], scores: dict, cfg: RecoverConfig) -> dict:
    """Held-out pairs under the final model: mean Δ_ref/Δ_te, reward accuracy (Δ_ref > 0) and objective
    accuracy (β1·Δ_ref + β2·Δ_te > 0)."""
    if not examples or "rejected_ids" not in examples[0]:
        return {}
    model, tok = load_model(spec)
    per_chunk = []
    sequence = ("_chosen_logps", "_rejected_logps")  # the cached scores the margins need (not a KD run's top-k)
    examples = [{**ex, **{k: v for k, v in scores[ex["id"]].items() if k.endswith(sequence)}} for ex in examples]
    for chunk, b in batches(examples, cfg.batch_size, tok.pad_token_id, "held-out pairs", model.device,
                            cfg.group_by_length):
        with autocast(cfg):  # the precision the cached π_ref/π_te scores were computed in
            out = response_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        d_ref, d_te = dadpo_margins(*pair_logps(out.sums, out.counts, b, len(chunk), cfg.margin))
        per_chunk.append(([ex["id"] for ex in chunk], d_ref.cpu(), d_te.cpu()))
    parts = unshard(per_chunk)
    at = {i: k for k, i in enumerate(i for ids, _, _ in parts for i in ids)}
    back = torch.tensor([at[ex["id"]] for ex in examples])  # the examples' order, whatever the batches' was
    d_ref, d_te = (torch.cat([p[k] for p in parts])[back] for k in (1, 2))
    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    u = cfg.beta1 * d_ref + beta2 * d_te
    return {"reward_acc": (d_ref > 0).float().mean().item(), "objective_acc": (u > 0).float().mean().item(),
            "margin_ref": d_ref.mean().item(),
            "margin_te": d_te.mean().item(), "pairs": len(d_ref),
            "teacher_term": teacher_term_stats(d_ref, d_te, cfg.beta1, beta2), "u": u.tolist()}


def start_teacher_term(examples: list[dict], scores: dict, cfg: RecoverConfig) -> tuple[dict, list[float]]:
    """`teacher_term_stats` and per-pair u of the training pairs as training starts: the policy is π_ref
    then, so Δ_ref = 0 and Δ_te = (log π_ref − log π_te)(y_c) − (…)(y_r), from the cached scores alone."""
    batch = {k: torch.tensor([scores[ex["id"]][k] for ex in examples], dtype=torch.float64)
             for k in ("ref_chosen_logps", "ref_rejected_logps", "teacher_chosen_logps", "teacher_rejected_logps")}
    counts = torch.tensor([len(ex["chosen_ids"]) for ex in examples] + [len(ex["rejected_ids"]) for ex in examples])
    sums = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    d_ref, d_te = dadpo_margins(*pair_logps(sums, counts, batch, len(examples), cfg.margin))
    beta2 = cfg.beta2 if cfg.method == "dadpo" else 0.0
    return teacher_term_stats(d_ref, d_te, cfg.beta1, beta2), (cfg.beta1 * d_ref + beta2 * d_te).tolist()
