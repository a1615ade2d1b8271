"""One preference-training step: dadpo's RecoverTrainer (dDPO and daDPO, cached π_ref/π_te log-probs, only the
policy resident) against TRL's DPOTrainer (policy + resident reference), same model, data, batch, sequence
length and precision, fp32 and bf16 autocast. Each configuration runs in a fresh subprocess so its peak RSS
is its own. Also measures the CPU's matmul peak (2048³, fp32 and bf16) and reports model FLOPs utilisation
= 6·N·tokens / step time against it.

    flock /tmp/dadpo-cpu.lock python benchmarks/recover_step.py [--model DIR] [--steps 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAIRS, SEQ, PROMPT = 4, 256, 64
PRUNED = "/tmp/dadpo-shared/smollm2-prune20"


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n³ matmul in `dtype_name` on this machine."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _texts(tok) -> list[dict]:
    """PAIRS prompt/chosen/rejected texts from Dolly, long enough to fill SEQ tokens (truncated later)."""
    from dadpo.data import load_prompts

    recs = [r for r in load_prompts("dolly")[:400] if r.reference and len(r.reference) > 300]
    long = " ".join(r.reference for r in recs)
    ids = tok(long, add_special_tokens=False).input_ids
    rows, step = [], SEQ
    for i in range(PAIRS):
        p = tok.decode(ids[i * 3 * step: i * 3 * step + PROMPT])
        c = tok.decode(ids[i * 3 * step + step: i * 3 * step + 2 * step])
        r = tok.decode(ids[i * 3 * step + 2 * step: i * 3 * step + 3 * step])
        rows.append({"prompt": p, "chosen": " " + c, "rejected": " " + r})
    return rows


class _Timer:
    """TrainerCallback recording wall time of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, *a, **k):
                timer.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.callback = CB()


def worker(impl: str, precision: str, model_spec: str, steps: int, warmup: int) -> dict:
    import torch

    from dadpo.models import load_model

    bf16 = precision == "bf16"
    policy, tok = load_model(model_spec)
    n_params = sum(p.numel() for p in policy.parameters())
    rows = _texts(tok) * (warmup + steps)  # one epoch = warmup + steps batches of PAIRS
    timer = _Timer()
    common = dict(per_device_train_batch_size=PAIRS, max_steps=warmup + steps, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, bf16=bf16, gradient_checkpointing=False,
                  learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, dataloader_pin_memory=False,
                  seed=0)
    out = tempfile.mkdtemp()
    if impl == "trl":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ref, _ = load_model(model_spec)
        tok.padding_side = "right"
        args = DPOConfig(output_dir=out, max_length=SEQ, beta=0.1, **common)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer.callback])
    else:
        from dadpo.recover.config import RecoverConfig
        from dadpo.recover.training import build_trainer

        examples = []
        for i, r in enumerate(rows):
            p = tok(r["prompt"], add_special_tokens=False).input_ids
            ex = {"id": str(i), "prompt_ids": p}
            for k in ("chosen", "rejected"):  # same layout as TRL's: prompt + completion + eos, SEQ tokens
                ex[f"{k}_ids"] = (tok(r[k], add_special_tokens=False).input_ids + [tok.eos_token_id])[: SEQ - len(p)]
            # cached scores: any numbers serve for timing (the step cost does not depend on them)
            ex.update(ref_chosen_logps=-400.0, ref_rejected_logps=-410.0, teacher_chosen_logps=-390.0,
                      teacher_rejected_logps=-420.0)
            examples.append(ex)
        method, _, ckpt = impl.partition("@")  # e.g. dpo@selective: dDPO with selective checkpointing
        cfg = RecoverConfig(method=method, batch_size=PAIRS, bf16=bf16, beta1=0.1, beta2=0.1,
                            activation_checkpointing=ckpt or "none")
        common.pop("gradient_checkpointing")
        trainer = build_trainer(policy, tok, examples, cfg, method, out, **{
            k: v for k, v in common.items() if k not in ("per_device_train_batch_size", "bf16", "seed")})
        trainer.add_callback(timer.callback)
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    trainer.train()
    t = timer.times[warmup:]
    step = sum(t) / len(t)
    return {"impl": impl, "precision": precision, "step_s": step, "step_min_s": min(t),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, "tokens": tokens,
            "params": n_params, "flops_per_step": 6 * n_params * tokens, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=PRUNED if os.path.isdir(PRUNED) else "smollm2-135m-instruct",
                    help="policy model (default: the 20%% prune if present, else SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--impls", default="trl,dpo,dadpo,dpo@selective,dpo@full",
                    help="comma-separated: trl, dpo, dadpo; METHOD@selective / METHOD@full add activation "
                    "checkpointing")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.model, args.steps, args.warmup)), flush=True)
        return
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    print(f"matmul peak 2048³: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)
    results = []
    for precision in args.precisions.split(","):
        for impl in args.impls.split(","):
            cmd = [sys.executable, __file__, "--worker", impl, precision, "--model", args.model,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{impl}/{precision} failed:\n{res.stderr[-3000:]}")
            r = json.loads(line[7:])
            r["mfu"] = r["flops_per_step"] / r["step_s"] / (peaks[precision] * 1e9)
            results.append(r)
            print(f"{impl:13s} {precision}: step {r['step_s']:.2f} s (min {r['step_min_s']:.2f}), peak RSS "
                  f"{r['peak_rss_gb']:.2f} GB, {r['tokens']} tokens, MFU {r['mfu']:.1%}", flush=True)
    by = {(r["impl"], r["precision"]): r for r in results}
    for p in args.precisions.split(","):
        trl, dpo, dadpo = by.get(("trl", p)), by.get(("dpo", p)), by.get(("dadpo", p))
        if trl and dpo:
            print(f"{p}: dDPO/TRL step {dpo['step_s'] / trl['step_s']:.2f}x, RSS "
                  f"{dpo['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x")
        if dpo and dadpo:
            print(f"{p}: daDPO/dDPO step {dadpo['step_s'] / dpo['step_s']:.2f}x")
        for ck in ("selective", "full"):
            r = by.get((f"dpo@{ck}", p))
            if r and trl:
                print(f"{p}: dDPO@{ck}/TRL step {r['step_s'] / trl['step_s']:.2f}x, RSS "
                      f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "matmul_gflops": peaks, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
