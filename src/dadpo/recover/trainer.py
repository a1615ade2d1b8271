"""`RecoverTrainer`: a `transformers.Trainer` whose loss is dSFT, token KD, dDPO or daDPO.

π_ref and π_te log-probs (and teacher top-k) are precomputed in the dataset, so only the policy is
resident. Everything else — accelerate, DDP/FSDP/DeepSpeed, checkpoints, resume, logging — is the
Trainer's own. Per-step logs add Δ_ref/Δ_te margins, reward accuracy (Δ_ref > 0: the DPO implicit reward β·log πθ/π_ref
ranks chosen over rejected, as TRL reports it), objective accuracy (β1·Δ_ref + β2·Δ_te > 0, daDPO's own
implicit reward) and chosen/rejected log-probs.

Every stage's gradient is that of the mean over the global batch (`batch_size` × `grad_accum`, whatever the
number of processes): token-level losses (dSFT, token KD) divide their token sums by the global token count
the Trainer passes as `num_items_in_batch`; pair losses take the mean over each micro-batch's pairs, divided
by the accumulation steps (the Trainer itself does not divide a custom loss: `loss_is_scaled_for_ga`).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers import Trainer, TrainerCallback

from dadpo.recover.batching import LengthGroupedOrder, example_length
from dadpo.recover.config import RecoverConfig
from dadpo.recover.forward import output_logits, response_logps
from dadpo.recover.losses import SATURATED, dadpo_loss, dadpo_margins, sft_loss, token_kd_loss
from dadpo.recover.pairs import pair_logps


class RecoverTrainer(Trainer):
    """Trainer for one recover stage; `stage` is "dsft" or the config's method."""

    loss_is_scaled_for_ga = True  # `compute_loss` scales for accumulation and processes itself

    def __init__(self, *args, recover: RecoverConfig, stage: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.recover, self.stage = recover, stage
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._orders: list[LengthGroupedOrder] = []
        if recover.group_by_length:
            self.add_callback(_EpochOfOrders(self._orders))

    def _get_train_sampler(self, train_dataset=None):
        """`recover.group_by_length`: a length-grouped order drawn from (seed, epoch) alone, so a resumed run
        trains on the batches the uninterrupted one would have."""
        if not self.recover.group_by_length:
            return super()._get_train_sampler(train_dataset)
        examples = self.train_dataset if train_dataset is None else train_dataset
        order = LengthGroupedOrder([example_length(ex) for ex in examples],
                                   self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                   self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        self._orders.append(order)
        return order

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the output layer runs outside model.forward (on the response positions only), outside the autocast
        # accelerate wraps the forward in for bf16/fp16, so enter the accelerator's autocast here
        tokens = num_items_in_batch if self.stage in TOKEN_STAGES else None
        with self.accelerator.autocast():
            loss, stats = recover_loss(model, inputs, self.recover, self.stage, tokens)
        if tokens is not None:
            if self.args.average_tokens_across_devices:  # then `tokens` counts every process's: a share of the
                loss = loss * self.accelerator.num_processes  # global mean, and DDP averages the gradients
        else:
            loss = loss / self.current_gradient_accumulation_steps
        for k, v in stats.items():
            self._stats[k].append(v)
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._stats and "loss" in logs:  # training log: add the means since the last log
            logs.update({k: sum(v) / len(v) for k, v in self._stats.items()})
            self._stats.clear()
        super().log(logs, start_time)


class _EpochOfOrders(TrainerCallback):
    """Sets each length-grouped order's epoch from the Trainer's state as an epoch begins (a resumed run's
    state comes from its checkpoint). accelerate's data loader also calls `set_epoch`, but does not reach a
    sampler under a resumed multi-process run (skipped batches → process shard → batch sampler → sampler)."""

    def __init__(self, orders: list[LengthGroupedOrder]):
        self.orders = orders

    def on_epoch_begin(self, args, state, control, **kwargs):
        for order in self.orders:
            order.set_epoch(int(state.epoch))


#: stages whose loss is a mean over response tokens (the others: over pairs)
TOKEN_STAGES = ("dsft", "kd")


def recover_loss(model, inputs: dict, cfg: RecoverConfig, stage: str, tokens: torch.Tensor | int | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage's loss on a collated batch, plus scalar stats to log. `tokens`: for a `TOKEN_STAGES` stage,
    the response-token count of the whole optimizer step, which the token sum is divided by (default: this
    batch's own count, i.e. its mean)."""
    out = response_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
    stats: dict[str, float] = {}
    if stage == "dsft":
        loss = sft_loss(out.tokens)
        stats["nll"] = loss.item()
        if tokens is not None:
            loss = -out.tokens.sum() / tokens
        return loss, stats
    rows = inputs["input_ids"].shape[0]
    n = rows // 2 if stage in ("dpo", "dadpo") else rows  # pairs: chosen rows first, then rejected
    loss = torch.zeros((), device=out.tokens.device)
    if stage in ("dpo", "dadpo"):
        pc, pr, rc, rr, tc, tr = pair_logps(out.sums, out.counts, inputs, n, cfg.margin)
        beta2 = cfg.beta2 if stage == "dadpo" else 0.0
        pair = dadpo_loss(pc, pr, rc, rr, tc, tr, cfg.beta1, beta2)
        loss = pair.mean()
        with torch.no_grad():
            d_ref, d_te = dadpo_margins(pc, pr, rc, rr, tc, tr)
            u = cfg.beta1 * d_ref + beta2 * d_te
            weight = torch.sigmoid(-u)
            stats.update({"pref_loss": loss.item(), "margin_ref": d_ref.mean().item(),
                          "margin_te": d_te.mean().item(), "reward_acc": (d_ref > 0).float().mean().item(),
                          "objective_acc": (u > 0).float().mean().item(), "weight": weight.mean().item(),
                          "saturated": (weight > SATURATED).float().mean().item(),
                          "logps_chosen": pc.mean().item(), "logps_rejected": pr.mean().item()})
    if cfg.kd.weight > 0 and "topk_logps" in inputs:
        chosen = out.rows < n
        logits = output_logits(model, out.hidden[chosen])
        per_token = token_kd_loss(logits, inputs["topk_logps"], inputs["topk_ids"], cfg.kd.kind, cfg.kd.jsd_beta)
        kd = per_token.mean()
        stats["kd"] = kd.item()
        if stage == "kd" and tokens is not None:  # the batch holds only the chosen (teacher) responses
            kd = per_token.sum() / tokens
        loss = loss + cfg.kd.weight * kd
    return loss, stats


_ATEN = torch.ops.aten
#: ops whose outputs selective checkpointing keeps: everything costly to recompute
_KEEP = {_ATEN.mm.default, _ATEN.addmm.default, _ATEN.bmm.default,
         _ATEN._scaled_dot_product_flash_attention_for_cpu.default,
         _ATEN._scaled_dot_product_efficient_attention.default, _ATEN._scaled_dot_product_flash_attention.default}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(model, mode: str) -> None:
    """Per-decoder-layer activation checkpointing: "full" recomputes whole layers in backward, "selective"
    recomputes only elementwise ops (norms, RoPE, SiLU, residual adds) and keeps matmul/attention outputs."""
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
