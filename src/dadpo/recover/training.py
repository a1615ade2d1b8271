"""A training stage of recover (dSFT, or the method's own) as a resumable `RecoverTrainer` run."""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path

import torch

from dadpo.distributed import agree, barrier, is_main, on_main
from dadpo.errors import DadpoError
from dadpo.io import atomic_write_json
from dadpo.models import load_model
from dadpo.recover.artefacts import last_complete_checkpoint, save_model
from dadpo.recover.config import RecoverConfig
from dadpo.recover.pairs import PairCollator

log = logging.getLogger(__name__)


def training_args(cfg: RecoverConfig, stage: str, ckpt: Path, **overrides):
    """TrainingArguments of a stage (`overrides` win: benchmarks set max_steps, save_strategy)."""
    from transformers import TrainingArguments

    dsft = stage == "dsft"
    kwargs = dict(
        output_dir=str(ckpt), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.dsft.lr if dsft else cfg.lr,
        num_train_epochs=cfg.dsft.epochs if dsft else cfg.epochs, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed,
        report_to="none" if cfg.report_to == "tensorboard" else cfg.report_to,  # tensorboard: `build_trainer`
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=False, weight_decay=0.0,
        optim="adamw_torch_fused",  # one fused kernel per step instead of foreach ops (~0.15 s of a 6 s CPU step)
        use_cpu=not torch.cuda.is_available())  # bf16 autocast on CPU needs use_cpu explicitly
    return TrainingArguments(**{**kwargs, **overrides})


def build_trainer(model, tok, examples: list[dict], cfg: RecoverConfig, stage: str, ckpt: Path, **overrides):
    """A `RecoverTrainer` for `stage` on `examples` (LoRA-wrapped when the config asks for it)."""
    from dadpo.recover.trainer import RecoverTrainer, enable_checkpointing

    enable_checkpointing(model, cfg.activation_checkpointing)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lc = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=lc.target_modules, task_type="CAUSAL_LM"))
    model.config.use_cache = False
    callbacks = []
    if cfg.report_to == "tensorboard":  # event files beside the stage's model, not under the checkpoints removed after
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(SummaryWriter(str(ckpt.parent / "tb"))))
    return RecoverTrainer(model=model, args=training_args(cfg, stage, ckpt, **overrides), train_dataset=examples,
                          data_collator=PairCollator(tok.pad_token_id), recover=cfg, stage=stage,
                          callbacks=callbacks)


def train_stage(spec: str, examples: list[dict], cfg: RecoverConfig, stage: str, work: Path,
           target: Path | None = None) -> Path:
    """Train `spec` on `examples` for `stage`, resuming from work/checkpoints; save the merged model."""
    target = target or work / "model"
    if agree((target / "config.json").is_file()):
        return target
    if cfg.lora and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise DadpoError("recover.lora under FSDP: the adapter cannot be merged into sharded weights; launch with "
                         "DDP (recipes/accelerate/ddp-8gpu.yaml) or train the full model")
    ckpt = work / "checkpoints"
    model, tok = load_model(spec)
    trainer = build_trainer(model, tok, examples, cfg, stage, ckpt)
    last = on_main(lambda: last_complete_checkpoint(ckpt))
    if last:
        log.info("%s: resuming from %s", stage, last)
    trainer.train(resume_from_checkpoint=last)
    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()
    # FSDP: every process gathers the full weights (a collective); DDP or one process: the model holds them
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped) if trainer.is_fsdp_enabled else None
    if is_main():  # once: every process holds the same weights
        _save(model, tok, trainer.state.log_history, work, target, ckpt, state)
    barrier()
    del trainer, model
    gc.collect()
    return target


def _save(model, tok, history: list[dict], work: Path, target: Path, ckpt: Path, state: dict | None) -> None:
    atomic_write_json(work / "log_history.json", history)
    save_model(model, tok, target, state)
    shutil.rmtree(ckpt, ignore_errors=True)
