"""`PruneConfig`: every knob of the prune stage, validated from plain dicts (CLI flags or a recipe's `prune:`).

Validators only check values against each other; checks that need the model (layer range inside the
model, reachability of the ratio) happen in `dadpo.prune.api` before any pruning or writing.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IMPORTANCES = ("taylor", "activation", "magnitude", "random")
TARGETS = ("mlp", "heads", "both")
ALLOCATIONS = ("uniform", "global")
_LAYERS = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


class PruneConfig(BaseModel):
    """What to prune, by which criterion, to which fraction of all parameters, and how to evaluate it."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(0.2, description="fraction of ALL parameters to remove (embeddings counted), (0, 0.9]")
    importance: Literal["taylor", "activation", "magnitude", "random"] = Field(
        "taylor", description="taylor = |w·dL/dw| on calibration data; activation = |w|·||x||; magnitude = L2")
    targets: Literal["mlp", "heads", "both"] = Field(
        "mlp", description="prune MLP channels, attention heads, or both (mlp measured best on SmolLM2)")
    layers: str | None = Field(None, description='decoder layers to prune, "start:end" (a Python slice; None = '
                               'all); keeping the first and last layers whole (LLM-Pruner style, e.g. 4:28 of 30) '
                               'matters a lot for quality')
    allocation: Literal["uniform", "global"] = Field(
        "uniform", description="uniform = same widths in every pruned layer; global = widths by importance per layer")
    calib: str = Field("dolly", description="prompt set for calibration (alias under $DADPO_DATA_DIR, file or hub id)")
    calib_samples: int = Field(64, ge=1, description="calibration sequences, sampled (seeded) from the set")
    calib_skip: int = Field(0, ge=0, description="sample calibration prompts only from the rows after the first "
                            "N of the set, e.g. the rows an evaluation set holds out (Dolly: evaluate.dolly_heldout)")
    calib_max_len: int = Field(512, ge=8, description="tokens per calibration sequence (prompt + reference)")
    calib_batch_size: int = Field(1, ge=1, description="Taylor takes |w·g| per batch: 1 = per sample (best)")
    reconstruct: bool = Field(True, description="least-squares refit of down_proj/o_proj kept columns on the "
                              "calibration inputs after cutting (dadpo.prune.reconstruct)")
    reconstruct_damping: float = Field(0.001, ge=0, description="ridge damping, fraction of mean diag of XᵀX")
    mlp_round_to: int = Field(8, ge=1, description="MLP widths are cut in blocks of this many channels")
    seed: int = Field(0, description="seed for calibration sampling and random importance")
    ppl_corpus: str = Field("wikitext2", description="perplexity corpus before and after pruning")
    ppl_seq_len: int = Field(128, ge=2, description="perplexity window length in tokens")
    ppl_window_stride: int = Field(10, ge=1, description="score every k-th window of the whole text: 1 = every "
                                   "window; 10 = a tenth of the time, a proxy whose pruned/dense ratio tracked the "
                                   "whole text's within ~1% (docs/benchmarks.md#prune)")
    ppl_max_windows: int | None = Field(None, ge=0, description="score at most N windows (0 = skip perplexity; "
                                        "None = all the stride gives)")
    sample_prompt: str = "Give three tips for staying healthy."
    sample_max_new_tokens: int = Field(48, ge=0)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v <= 0.9:
            raise ValueError(f"must be in (0, 0.9], got {v}")
        return v

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _LAYERS.match(v)
        if not m:
            raise ValueError(f'must look like "4:28" (start:end), got {v!r}')
        start, end = m.groups()
        if start and end and int(start) >= int(end):
            raise ValueError(f"{v!r} is empty (start must be < end)")
        return v.replace(" ", "")

    def layer_range(self, n_layers: int) -> range:
        """The decoder layers to prune in a model with `n_layers` layers (fails if the range leaves it)."""
        from dadpo.errors import DadpoError

        if self.layers is None:
            return range(n_layers)
        start, end = _LAYERS.match(self.layers).groups()
        start, end = int(start or 0), int(end) if end else n_layers
        if end > n_layers or start >= n_layers:
            raise DadpoError(f"layers {self.layers!r} is outside the model's {n_layers} decoder layers (0:{n_layers})")
        return range(start, end)
