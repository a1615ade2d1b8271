"""`DecodingConfig`: how answers are decoded, declared once for every place that generates — `dadpo generate`
(`GenerationConfig`), recover's pair sampling (`recover.sampling`) and evaluation answers
(`evaluate.generation`). Each constraint and help text lives on the annotated types below; a use that needs
other defaults (recover samples at temperature 0.7, evaluation at 1) subclasses and restates only the default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MaxNewTokens = Annotated[int, Field(ge=1, description="tokens per answer at most")]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False, description="0 = greedy, > 0 samples")]
TopP = Annotated[float, Field(gt=0, le=1, description="nucleus sampling mass")]
BatchSize = Annotated[int, Field(ge=1, description="prompts decoded at once")]
Precision = Annotated[Literal["auto", "model", "bfloat16"], Field(
    description="arithmetic: auto = bf16 matmuls when sampling a float32 Llama-family model on a CPU with bf16 "
    "instructions (AMX, AVX-512 BF16), else the model's dtype (greedy answers then equal model.generate's)")]


class DecodingConfig(BaseModel):
    """Decoding settings; temperature 0 means greedy. `precision` is resolved per model and machine by
    `dadpo.engine.resolve_precision`."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: MaxNewTokens = 256
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    batch_size: BatchSize = 16
    precision: Precision = "auto"


class GenerationConfig(DecodingConfig):
    """One generation job's settings: decoding plus the sampling seed. A sampled answer depends only on the
    seed, the prompt id and these settings (not on the batch or position it lands in)."""

    seed: int = Field(0, description="sampling seed")

    @classmethod
    def of(cls, decoding: DecodingConfig, seed: int) -> GenerationConfig:
        """The job that decodes like `decoding` (a recipe section) under `seed`."""
        return cls(**{k: getattr(decoding, k) for k in DecodingConfig.model_fields}, seed=seed)
