"""Model forward passes that return response-token log-probs without full-vocabulary logits kept.

Only labelled (response) positions go through the output layer; with a plain linear output layer the
log-probs come from `linear_token_logps`, which never holds the (tokens × vocab) logits at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dadpo.recover.losses import IGNORE_INDEX, linear_token_logps, token_logps


@dataclass
class ResponseLogps:
    """Per-token log-probs of labelled positions (row-major), their row ids and per-row sums/counts."""

    tokens: torch.Tensor  # (N,)
    rows: torch.Tensor  # (N,)
    sums: torch.Tensor  # (B,)
    counts: torch.Tensor  # (B,)
    hidden: torch.Tensor  # (N, H): final hidden states at those positions (for KD logits)


def _head(model):
    """The output layer of `model`, inside a DistributedDataParallel and/or peft wrapper."""
    model = getattr(model, "module", model)  # DDP
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits for selected hidden states (N, H) → (N, V)."""
    return _head(model)(hidden)


def response_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                   ) -> ResponseLogps:
    """Run `model` on a right-padded batch and return log p of every labelled next token. The forward goes
    through `model` itself (a DDP wrapper must see it to synchronise gradients) for the final hidden states
    (logits of the last position only); the output layer then reads just the labelled positions."""
    head = _head(model)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True,
                   logits_to_keep=1).hidden_states[-1]
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    h = hidden[:, :-1][mask]
    y = target[mask]
    if type(head) is torch.nn.Linear and head.bias is None:
        lp = linear_token_logps(h, head.weight, y)
    else:  # adapted or biased output layer: materialise logits for the response positions only
        lp = token_logps(head(h), y)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return ResponseLogps(lp, rows, sums, mask.sum(-1), h)


@torch.no_grad()
def teacher_topk(model, hidden: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (log-prob, id) per position from selected hidden states, in chunks of positions."""
    vals, ids = [], []
    for s in range(0, hidden.shape[0], chunk):
        lp = torch.log_softmax(output_logits(model, hidden[s:s + chunk]).float(), dim=-1)
        v, i = lp.topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)
