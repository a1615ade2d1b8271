"""Least-squares refit of the Linears whose input columns are pruned (MLP down_proj, attention o_proj).

Removing MLP channels or heads deletes input columns of the layer that reads them. Instead of just
dropping those columns, refit the kept ones so that the layer's output on the calibration inputs changes
as little as possible (the closed form behind OBS/ZipLM-style structured pruning, one layer at a time):

    min_W' || X Wᵀ - X_S W'ᵀ ||²   →   W' = W H[:, S] (H[S, S] + λI)⁻¹,   H = Xᵀ X

with X the layer's calibration inputs (padding excluded), S the kept columns and λ a damping of
`damping` × mean diag H[S, S]. The removed columns' average contribution is thereby folded into the
kept ones. H comes from the unpruned model; only the weights of kept columns change, never the shapes.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


class InputGrams:
    """While active, accumulate H = Σ x xᵀ of each given Linear's input over the non-padding tokens of every
    forward pass of `model` (so the Taylor/activation scoring passes collect it for free).

    float32 on the model's device (Vicuna-7B: 32 × 11008² × 4 bytes ≈ 15.5 GB for the MLPs; SmolLM2: 0.25 GB)."""

    def __init__(self, model, linears: list[nn.Linear]):
        self.model, self.linears = model, linears
        self.grams: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> InputGrams:
        self._handles = [self.model.register_forward_pre_hook(self._take_mask, with_kwargs=True)]
        self._handles += [lin.register_forward_pre_hook(self._add) for lin in self.linears]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _take_mask(self, _model, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask.bool() if mask is not None else None

    @torch.no_grad()
    def _add(self, lin, args) -> None:
        x = args[0].detach()
        x = (x[self._mask] if self._mask is not None else x.reshape(-1, x.shape[-1])).float()
        if id(lin) in self.grams:
            self.grams[id(lin)].addmm_(x.T, x)
        else:
            self.grams[id(lin)] = x.T @ x


@torch.no_grad()
def forward_passes(model, batches: list[dict]) -> None:
    """Run the calibration batches through `model` (to feed an active InputGrams)."""
    for batch in tqdm(batches, desc="reconstruct: input statistics", leave=False):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


@torch.no_grad()
def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, kept: list[int], damping: float
                       ) -> torch.Tensor:
    """The refitted (out, len(kept)) weight for a Linear of dense `weight` (out, in) whose inputs `kept` stay."""
    idx = torch.tensor(kept, dtype=torch.long, device=gram.device)
    rhs = gram[:, idx].double()  # (in, |S|)
    h_ss = rhs[idx]
    h_ss.diagonal().add_(damping * h_ss.diagonal().mean().clamp_min(1e-12))
    w = weight.detach().to(device=gram.device, dtype=torch.float64)
    refit = torch.linalg.solve(h_ss, (w @ rhs).T).T  # W H[:, S] H_SS⁻¹ (H_SS symmetric)
    return refit.to(dtype=weight.dtype, device=weight.device)
