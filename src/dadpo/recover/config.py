"""`RecoverConfig`: every hyper-parameter of a recover run, validated up front (no model is loaded here).

A recipe YAML embeds it as its `recover:` section; `dadpo recover` builds it from its flags.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dadpo.decoding import DecodingConfig, MaxNewTokens, Temperature, TopP
from dadpo.settings import validated


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KDConfig(_Section):
    """Token-level KD term on teacher responses, from the teacher's cached top-k log-probs."""

    kind: Literal["fwd", "rev", "jsd"] = Field(
        "fwd", description="divergence: fwd = forward KL, rev = reverse KL, jsd = generalized JSD")
    top_k: int = Field(20, ge=1, description="teacher log-probs kept per position (the rest is one tail bucket)")
    weight: float = Field(0.0, ge=0, description="KD weight added to a preference loss; method kd uses 1 if 0")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="β of generalized JSD (0 = forward KL, 1 = reverse)")


class LoraConfig(_Section):
    """peft LoRA on the student; merged back into it on save."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="the modules that get adapters")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str]) -> list[str]:
        """peft needs at least one module name to put adapters on; an empty list fails only after the
        teacher has answered every prompt, so it is refused here."""
        if not v or any(not m.strip() for m in v):
            raise ValueError(f"give at least one module name, and no empty names, got {v}")
        return v


class SamplingConfig(DecodingConfig):
    """How teacher (chosen) and student (rejected) responses are sampled, once, before training."""

    max_new_tokens: MaxNewTokens = 192
    temperature: Temperature = 0.7
    top_p: TopP = 0.95
    student_from: Literal["dsft", "student"] = Field(
        "dsft", description="sample rejected responses from the dSFT model (paper) or the raw student")


class DSFTConfig(_Section):
    """The distilled-SFT stage that turns the student into π_ref."""

    epochs: float = Field(1.0, gt=0, description="epochs of distilled SFT")
    lr: float = Field(5e-5, gt=0, description="learning rate of distilled SFT")


class RecoverConfig(_Section):
    """A recover run: dSFT → pairs → scoring → preference/KD training. `method` picks the last stage:
    dsft (stop after dSFT), kd (token KD), dpo (dDPO, β1 only), dadpo (β1·Δ_ref + β2·Δ_te). Every last
    stage starts from the dSFT model (π_ref), as in Zephyr's dDPO and the daDPO paper."""

    method: Literal["dsft", "kd", "dpo", "dadpo"] = Field(
        "dadpo", description="the last stage: dsft = stop after distilled SFT; kd = token KD; dpo = dDPO; "
        "dadpo = distribution-aware DPO")
    beta1: float = Field(0.1, description="β1: weight of the KL to π_ref (the DPO β)")
    beta2: float = Field(0.1, description="β2: weight of the KL to the teacher (daDPO only)")
    margin: Literal["sum", "mean"] = Field(
        "sum", description="log-probs in Δ_ref and Δ_te: sum = each response's sequence log-prob (the paper's); "
        "mean = per-token averages (DPKD, DistiLLM-2), which puts both margins on a ~1-nat scale")
    kd: KDConfig = Field(default_factory=KDConfig)
    lr: float = Field(5e-6, gt=0, description="learning rate of the last stage")
    epochs: float = Field(1.0, gt=0, description="epochs of the last stage")
    batch_size: int = Field(4, ge=1, description="pairs (or sequences for dSFT/KD) per process and step; "
                            "the global batch is batch_size × grad_accum × processes")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_prompt_len: int = Field(256, ge=1, description="prompt tokens kept (cut from the left)")
    max_response_len: int = Field(256, ge=1, description="response tokens kept (cut from the right)")
    lora: LoraConfig | None = Field(None, description="LoRA settings; null = full fine-tuning")
    bf16: bool = Field(False, description="bf16 autocast for training and scoring forward passes")
    group_by_length: bool = Field(
        False, description="batch examples of similar length: training in length-sorted groups of up to 50 "
        "batches (the group order random, seeded per epoch, so a resumed run sees the same batches) and "
        "scoring in length order: a third of a random batch of Dolly pairs is padding, length-grouped ones "
        "almost none; it changes which examples share a batch, so training takes another path")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="recompute activations in backward: selective = only cheap elementwise ops "
        "(norms, RoPE, SiLU), keeping matmul/attention outputs; full = whole decoder layers")
    seed: int = Field(0, description="seed for sampling, data order and initialisation")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup, as a fraction of the steps")
    save_steps: int = Field(50, ge=1, description="Trainer checkpoint every N optimizer steps (resume point)")
    logging_steps: int = Field(1, ge=1, description="Trainer log (loss, margins, accuracies) every N optimizer steps")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="where the Trainer also sends its logs: tensorboard (event files in each training "
        "stage's folder, under tb/) or wandb (its own project settings from WANDB_* variables); "
        "log_history.json and training_curves.png are written either way")
    skip_prompts: int = Field(0, ge=0, description="ignore the first N prompts of the set, e.g. the rows an "
                              "evaluation set holds out (Dolly: evaluate.dolly_heldout); never trained on")
    train_prompts: int | None = Field(None, ge=1, description="train on this many prompts (after the held-out)")
    eval_prompts: int = Field(0, ge=0, description="first N prompts (after the skipped) held out for evaluation "
                              "pairs and NLL")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    dsft: DSFTConfig = Field(default_factory=DSFTConfig)

    @field_validator("beta1", "beta2")
    @classmethod
    def _beta_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("report_to")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        """The Trainer would fail on a missing backend only after the teacher has answered every prompt."""
        import importlib.util

        if v != "none" and importlib.util.find_spec(v) is None:
            raise ValueError(f"{v} is not installed in this environment (pip install {v})")
        return v

    @model_validator(mode="after")
    def _kd_weight(self) -> RecoverConfig:
        if self.method == "kd" and self.kd.weight == 0:
            self.kd.weight = 1.0
        return self

    @property
    def needs_pairs(self) -> bool:
        return self.method in ("dpo", "dadpo")

    @property
    def needs_topk(self) -> bool:
        return self.kd.weight > 0 and self.method != "dsft"

    @classmethod
    def parse(cls, data: dict, name: Callable[[str], str] = lambda loc: f"recover.{loc}".rstrip(".")) -> RecoverConfig:
        """Validate a dict (YAML section, CLI flags) into a config; the first error becomes one DadpoError
        line naming the field as `name(dotted.location)` (a YAML key by default, a flag for the CLI)."""
        return validated(cls, data, name)
