"""The recover losses as pure tensor functions: sequence log-probs, dSFT, DPO, daDPO and token-level KD.

Sequence log-probs never keep a (B, T, V) log-softmax: `token_logps` works on logits in chunks of
positions, and `linear_token_logps` goes one step further and never materialises the logits at all
(it multiplies hidden states by the output embedding chunk by chunk; backward reuses the softmax kept in
the matmul dtype when it is small enough, else recomputes it).

Token KD uses the teacher's cached top-k log-probs per position. The rest of the vocabulary is kept as
one explicit *tail* bucket: the teacher's tail mass is 1 − Σ top-k probs, the student's is 1 − Σ of its
own probs on the teacher's top-k ids. The divergence is then the exact divergence between these two
(k+1)-outcome distributions; it equals the full-vocabulary divergence when k = V and is a lower bound of
it otherwise (coarsening can only shrink an f-divergence), so no probability mass is silently dropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
#: positions handled per chunk: (chunk × V) floats at a time (8192 × 49152 × 4 B ≈ 1.6 GB would be too many)
CHUNK = 1024
#: `linear_token_logps` keeps the softmax for backward up to this size, saving the backward's logits matmul
#: and its float32 passes (bf16 daDPO step on SmolLM2's 20% prune 6.48 → 5.92 s, docs/benchmarks.md#recover);
#: beyond it, recomputes. 1,536 response positions × 49,152 vocab fit in bf16 (151 MB), not in float32 (302 MB).
KEEP_PROBS_BYTES = 256 * 2**20


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(label) per position from logits (N, V), chunked; backward recomputes the softmax per chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        g_logits = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            g = -torch.exp(logits[sl].float() - lse[sl, None]) * grad[sl, None]  # −softmax · grad
            g.scatter_add_(-1, labels[sl, None], grad[sl, None])  # + onehot · grad
            g_logits[sl] = g.to(logits.dtype)
        return g_logits, None, None


class _LinearTokenLogps(torch.autograd.Function):
    """log p(label) per position from hidden states (N, H) and output embedding (V, H), chunked; the logits are
    never stored. Backward needs the softmax: kept from forward in the matmul dtype when N × V of it fits in
    `KEEP_PROBS_BYTES`, else recomputed chunk by chunk (one extra output-layer matmul) to save that memory."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                for_backward: bool) -> torch.Tensor:
        dev = hidden.device.type  # under autocast, both passes' matmuls run in the autocast dtype
        ctx.dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        w = weight.to(ctx.dtype)
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        n_bytes = labels.numel() * weight.shape[0] * w.element_size()
        keep = for_backward and n_bytes <= KEEP_PROBS_BYTES
        probs = torch.empty(labels.numel(), weight.shape[0], dtype=ctx.dtype, device=hidden.device) if keep else None
        for s in range(0, hidden.shape[0], chunk):
            sl = slice(s, s + chunk)
            x = hidden[sl].to(ctx.dtype) @ w.T
            picked = x.gather(-1, labels[sl, None]).squeeze(-1).float()
            e = x.float()  # x itself when already float32: overwritten in place below (no temporaries)
            m = e.amax(-1, keepdim=True)
            total = e.sub_(m).exp_().sum(-1, keepdim=True)
            lse[sl] = (total.log() + m).squeeze(-1)
            out[sl] = picked - lse[sl]
            if probs is not None:
                probs[sl] = e.div_(total)
        ctx.save_for_backward(hidden, weight, labels, lse, out, probs)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, labels, lse, out, probs = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            h = hidden[sl].to(ctx.dtype)
            if probs is not None:  # −softmax · grad
                g = probs[sl] * -grad[sl, None].to(ctx.dtype)
            else:
                g = (h @ w.T).float().sub_(lse[sl, None]).exp_().mul_(-grad[sl, None])
            # the label's entry, grad · (1 − p), from the float32 log-prob: no cancellation in low precision
            g.scatter_(-1, labels[sl, None], (-torch.expm1(out[sl]) * grad[sl]).to(g.dtype)[:, None])
            g = g.to(ctx.dtype)
            if g_hidden is not None:
                g_hidden[sl] = (g @ w).to(hidden.dtype)
            if g_weight is not None:
                g_weight += (g.T @ h).float()
        return g_hidden, None if g_weight is None else g_weight.to(weight.dtype), None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """log softmax(logits)[label] for logits (..., V) and labels (...), in chunks of positions (float32)."""
    shape = labels.shape
    out = _ChunkedTokenLogps.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), chunk)
    return out.view(shape)


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       chunk: int = CHUNK) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] for hidden (N, H), weight (V, H), labels (N): no (N, V) logits kept;
    the softmax is kept for backward only when a backward will run and it fits in `KEEP_PROBS_BYTES`."""
    for_backward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearTokenLogps.apply(hidden, weight, labels, chunk, for_backward)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p, token count) per sequence of causal-LM `logits` (B, T, V) for `labels` (B, T).

    Logits at position t predict labels at t + 1; positions labelled `ignore_index` (prompt, padding)
    are left out. Only the labelled positions' logits are touched, in chunks.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != ignore_index
    lp = token_logps(logits[mask], labels[mask], chunk)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)
    return sums, mask.sum(-1)


def sft_loss(token_lp: torch.Tensor) -> torch.Tensor:
    """dSFT: mean negative log-likelihood over all response tokens of the batch."""
    return -token_lp.mean()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Sigmoid DPO per pair: −log σ(β·Δ_ref), Δ_ref = (log πθ(y_c) − log π_ref(y_c)) − (… y_r)."""
    return dadpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, ref_chosen, ref_rejected,
                      beta1=beta, beta2=0.0)


def dadpo_margins(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, teacher_chosen: torch.Tensor, teacher_rejected: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ_ref, Δ_te) per pair: the chosen-minus-rejected log-ratio against π_ref and against π_te."""
    policy = policy_chosen - policy_rejected
    return policy - (ref_chosen - ref_rejected), policy - (teacher_chosen - teacher_rejected)


def dadpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, teacher_chosen: torch.Tensor, teacher_rejected: torch.Tensor,
               beta1: float, beta2: float) -> torch.Tensor:
    """daDPO per pair: −log σ(β1·Δ_ref + β2·Δ_te); β2 = 0 is dDPO exactly (the teacher term vanishes).

    The log-probs are whatever the caller passes: sequence sums (`recover.margin: sum`, the paper's), or
    per-token means from `per_token` (`margin: mean`, as DPKD and DistiLLM-2 do), which makes
    Δ = (log πθ(y_c)/|y_c| − log π(y_c)/|y_c|) − (… y_r) and puts both margins on a ~1-nat scale."""
    d_ref, d_te = dadpo_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                teacher_chosen, teacher_rejected)
    u = beta1 * d_ref if beta2 == 0 else beta1 * d_ref + beta2 * d_te
    return -F.logsigmoid(u)


def per_token(logps: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sequence log-probs (sums over each response's tokens) → per-token means (`recover.margin: mean`)."""
    return logps / counts.to(logps.dtype).clamp(min=1)


#: σ(−u) above this: the pair's gradient weight no longer depends on u (the sigmoid is saturated)
SATURATED = 0.99


@torch.no_grad()
def teacher_term_stats(d_ref: torch.Tensor, d_te: torch.Tensor, beta1: float, beta2: float) -> dict[str, float]:
    """How daDPO's teacher term acts on a set of pairs. u = β1·Δ_ref + β2·Δ_te; each pair's gradient is
    scaled by w = σ(−u). When u ≪ 0 for every pair, w ≈ 1 everywhere (`saturated` ≈ 1): the teacher then
    only rescales dDPO's direction, which Adam undoes. Returns the mean and 5/25/50/75/95% quantiles of u,
    mean Δ_ref and Δ_te, mean w and the share of pairs with w > 0.99."""
    u = (beta1 * d_ref + beta2 * d_te).double()
    w = torch.sigmoid(-u)
    q = torch.quantile(u, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=u.dtype, device=u.device)).tolist()
    return {"pairs": len(u), "u_mean": u.mean().item(), **{f"u_q{p:02d}": v for p, v in zip((5, 25, 50, 75, 95), q,
                                                                                         strict=True)},
            "margin_ref": d_ref.double().mean().item(), "margin_te": d_te.double().mean().item(),
            "weight": w.mean().item(), "saturated": (w > SATURATED).double().mean().item()}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_with_tail(logps_topk: torch.Tensor) -> torch.Tensor:
    """Append the log tail mass log(1 − Σ exp(top-k)) to top-k log-probs (..., k) → (..., k + 1)."""
    tail = _log1mexp(torch.logsumexp(logps_topk, dim=-1, keepdim=True))
    return torch.cat([logps_topk, tail], dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) over the last dim, 0·log 0 = 0."""
    return torch.where(logp > -torch.inf, logp.exp() * (logp - logq), 0.0).sum(-1)


def token_kd_loss(student_logits: torch.Tensor, teacher_topk_logps: torch.Tensor, teacher_topk_ids: torch.Tensor,
                  kind: str = "fwd", beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher and student next-token distributions, (N, V) student logits
    vs (N, k) cached teacher top-k log-probs/ids, both reduced to the top-k ids + one tail bucket.

    kind: "fwd" KL(teacher‖student), "rev" KL(student‖teacher), "jsd" generalized JSD(β) as in GKD/TRL:
    β·KL(te‖m) + (1−β)·KL(st‖m) with m = β·te + (1−β)·st (β = 0 → forward KL, β = 1 → reverse KL).
    """
    s_all = torch.log_softmax(student_logits.float(), dim=-1)
    s = topk_with_tail(s_all.gather(-1, teacher_topk_ids))
    t = topk_with_tail(teacher_topk_logps.float())
    if kind == "fwd" or (kind == "jsd" and beta == 0):
        return _kl(t, s)
    if kind == "rev" or (kind == "jsd" and beta == 1):
        return _kl(s, t)
    if kind != "jsd":
        raise ValueError(f"unknown KD kind {kind!r}")
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)
