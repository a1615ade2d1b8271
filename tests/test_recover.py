"""The recover stage: config and input checks, collator, the Trainer on a real model, the whole pipeline on
tiny random Llama models (real transformers/peft/Trainer code paths), and kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dadpo.errors import DadpoError
from dadpo.recover import RecoverConfig, run_recover
from dadpo.recover.pairs import PairCollator, encode_example


def _tiny_model(path: Path, tok_dir: Path, seed: int, extra_token: str | None = None) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer (optionally with one more token)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    if extra_token:
        tok.add_tokens([extra_token])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": f"Say something about the number {i}.", "id": str(i)} for i in range(10)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": str(_tiny_model(root / "student", smollm_dir, 0)),
            "teacher": str(_tiny_model(root / "teacher", smollm_dir, 1)),
            "other": str(_tiny_model(root / "other", smollm_dir, 2, extra_token="<zz>")),
            "prompts": str(prompts)}


TINY_CFG = {"train_prompts": 6, "eval_prompts": 2, "batch_size": 2, "max_prompt_len": 32, "max_response_len": 16,
            "save_steps": 1, "lr": 1e-3, "sampling": {"max_new_tokens": 8, "batch_size": 4},
            "dsft": {"lr": 1e-3}}


# --- config and bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,needle", [
    ({"beta1": 0}, "recover.beta1: must be > 0"),
    ({"beta2": -0.1}, "recover.beta2: must be > 0"),
    ({"method": "ppo"}, "recover.method"),
    ({"margin": "median"}, "recover.margin"),
    ({"lr": 0}, "recover.lr"),
    ({"kd": {"top_k": 0}}, "recover.kd.top_k"),
    ({"lora": {"r": 8, "alhpa": 3}}, "recover.lora.alhpa"),
    ({"learning_rate": 1e-5}, "recover.learning_rate"),
])
def test_config_errors_are_one_line_naming_the_field(data, needle):
    with pytest.raises(DadpoError) as e:
        RecoverConfig.parse(data)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_logging_backend_that_is_not_installed_is_refused_up_front(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(DadpoError, match=r"^recover.report_to: wandb is not installed in this environment"):
        RecoverConfig.parse({"report_to": "wandb"})
    assert RecoverConfig.parse({"report_to": "tensorboard", "logging_steps": 5}).logging_steps == 5


def test_config_kd_method_defaults_weight_and_roundtrips():
    cfg = RecoverConfig.parse({"method": "kd", "kd": {"kind": "jsd"}})
    assert cfg.kd.weight == 1.0 and cfg.needs_topk and not cfg.needs_pairs
    assert RecoverConfig.parse(cfg.model_dump()) == cfg


def test_cli_flags_map_to_config_and_errors_name_the_flag(capsys):
    from dadpo.cli import main

    base = ["recover", "--student", "s", "--teacher", "t", "--prompts", "p", "--out", "o"]
    assert main([*base, "--kd-top-k", "0"]) == 2
    assert "dadpo recover: error: --kd-top-k:" in capsys.readouterr().err
    assert main([*base, "--beta2", "0"]) == 2
    assert "--beta2: must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--method", "ppo"])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err


def test_different_vocabularies_rejected_before_model_work(tiny, tmp_path):
    with pytest.raises(DadpoError, match="different vocabularies"):
        run_recover(tiny["other"], tiny["teacher"], tiny["prompts"], tmp_path / "run", TINY_CFG)
    assert not (tmp_path / "run").exists()


def test_empty_prompt_set_rejected(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DadpoError, match="empty"):
        run_recover(tiny["student"], tiny["teacher"], str(empty), tmp_path / "run", TINY_CFG)
    with pytest.raises(DadpoError, match="no training prompts"):
        run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], tmp_path / "run", {"eval_prompts": 10})


# --- collator ------------------------------------------------------------------------------------------------

def test_collator_masks_prompt_and_padding(smollm):
    _, tok = smollm
    msgs = [{"role": "user", "content": "Hi there"}]
    ex = encode_example(tok, "a", msgs, "Hello! How can I help?", "Go away.", 64, 64)
    ex2 = encode_example(tok, "b", [{"role": "user", "content": "A much longer question here?"}], "Yes.", "No, never.",
                         64, 64)
    assert tok.decode(ex["chosen_ids"]).endswith("<|im_end|>")  # the model learns to stop
    for e in (ex, ex2):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = -1.0, -2.0
    b = PairCollator(tok.pad_token_id)([ex, ex2])
    assert b["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert b["ref_chosen_logps"].tolist() == [-1.0, -1.0] or b["ref_chosen_logps"].shape == (2,)
    for row, (p, r) in enumerate([(ex["prompt_ids"], ex["chosen_ids"]), (ex2["prompt_ids"], ex2["chosen_ids"]),
                                  (ex["prompt_ids"], ex["rejected_ids"]), (ex2["prompt_ids"], ex2["rejected_ids"])]):
        n = len(p) + len(r)
        assert b["input_ids"][row, :n].tolist() == p + r
        assert (b["labels"][row, :len(p)] == -100).all() and b["labels"][row, len(p):n].tolist() == r
        assert (b["labels"][row, n:] == -100).all() and b["attention_mask"][row].sum() == n


# --- training on the real model ------------------------------------------------------------------------------

def test_few_dpo_steps_raise_the_margin_on_real_smollm(smollm_dir, tmp_path):
    """Two RecoverTrainer steps of daDPO on SmolLM2 (fresh copy) raise β1·Δ_ref + β2·Δ_te on the pairs."""
    from dadpo.models import load_model
    from dadpo.recover.forward import response_logps
    from dadpo.recover.training import build_trainer

    model, tok = load_model(str(smollm_dir))
    qa = [("What is the capital of France?", "The capital of France is Paris.", "I like turtles a lot."),
          ("Give me a colour.", "Blue.", "The number seven, obviously."),
          ("How many legs does a spider have?", "A spider has eight legs.", "Spiders are green cars.")]
    exs = [encode_example(tok, str(i), [{"role": "user", "content": q}], c, r, 64, 32)
           for i, (q, c, r) in enumerate(qa)]
    batch = PairCollator(tok.pad_token_id)(exs)
    with torch.no_grad():
        ref = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sums
    for i, ex in enumerate(exs):  # π_ref = the start; a "teacher" that likes the chosen answers a bit more
        ex.update(ref_chosen_logps=ref[i].item(), ref_rejected_logps=ref[3 + i].item(),
                  teacher_chosen_logps=ref[i].item() + 1.0, teacher_rejected_logps=ref[3 + i].item() - 1.0)
    cfg = RecoverConfig.parse({"method": "dadpo", "beta1": 0.1, "beta2": 0.1, "lr": 2e-5, "batch_size": 3,
                               "warmup_ratio": 0.0, "epochs": 2, "save_steps": 100})
    trainer = build_trainer(model, tok, exs, cfg, "dadpo", tmp_path / "ckpt")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward_acc" in h]
    assert len(logs) == 2 and all("margin_te" in h and "logps_chosen" in h for h in logs)
    with torch.no_grad():
        after = response_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sums
    margin_before = (ref[:3] - ref[3:]) - (ref[:3] - ref[3:])  # Δ_ref at the start is 0
    d_ref = (after[:3] - after[3:]) - (ref[:3] - ref[3:])
    assert (d_ref > margin_before + 0.5).all(), d_ref
    assert logs[-1]["loss"] < logs[0]["loss"]


@pytest.mark.parametrize("stage", ["dsft", "dpo"])
def test_accumulated_micro_batches_train_like_one_batch(tiny, tmp_path, stage):
    """One optimizer step over 4 examples of unequal lengths: as one batch of 4, as 2 × 2 accumulated, as
    4 × 1: the same loss and gradient norm (dSFT: the mean over all response tokens; dDPO: over all pairs),
    and the same weights after the step. Plain SGD makes the step: Adam's first step is lr·sign(gradient),
    which turns the last-bit differences of float32 sums over other batch shapes into ±lr on the weights
    whose gradient is near 0 (seen on an AMD EPYC, where MKL's products round by batch size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dadpo.recover.training import build_trainer

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    answers = ["Yes.", "A much longer answer that goes on for a while.", "Seven", "Blue, like the sky at noon."]
    exs = [encode_example(tok, str(i), [{"role": "user", "content": f"Question {i}?"}], a,
                          answers[(i + 1) % 4] if stage == "dpo" else None, 32, 16) for i, a in enumerate(answers)]
    for i, ex in enumerate(exs):
        ex.update(ref_chosen_logps=-20.0 - i, ref_rejected_logps=-25.0 + i, teacher_chosen_logps=-18.0,
                  teacher_rejected_logps=-30.0)
    runs = []
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        model = AutoModelForCausalLM.from_pretrained(tiny["student"])
        cfg = RecoverConfig.parse({"method": "dpo", "batch_size": bs, "grad_accum": ga, "lr": 1e-3,
                                   "warmup_ratio": 0.0, "save_steps": 100, "dsft": {"lr": 1e-3}})
        trainer = build_trainer(model, tok, exs, cfg, stage, tmp_path / f"{bs}x{ga}", optim="sgd")
        trainer.train()
        log = next(h for h in trainer.state.log_history if "loss" in h)
        runs.append((log["loss"], log["grad_norm"], torch.cat([p.detach().flatten() for p in model.parameters()])))
    for loss, norm, weights in runs[1:]:
        assert loss == pytest.approx(runs[0][0], abs=1e-4) and norm == pytest.approx(runs[0][1], rel=1e-4)
        assert torch.allclose(weights, runs[0][2], atol=1e-6)


# --- length-grouped batches ----------------------------------------------------------------------------------

def test_length_grouped_order_is_a_seeded_permutation_with_little_padding():
    """Each epoch's order is a permutation drawn from (seed, epoch) alone, and its batches of 4 waste far less
    on padding than a random order's (lengths like Dolly pairs': 30 to 350 tokens)."""
    from dadpo.recover.batching import LengthGroupedOrder

    lengths = torch.randint(30, 350, (512,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(order):
        batches = [[lengths[i] for i in order[s:s + 4]] for s in range(0, len(order), 4)]
        return sum(len(b) * max(b) - sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)

    sampler = LengthGroupedOrder(lengths, 4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(512)) and list(LengthGroupedOrder(lengths, 4, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(512))
    assert list(LengthGroupedOrder(lengths, 4, seed=4)) != first
    assert padding(first) < 0.05 < 0.2 < padding(torch.randperm(512).tolist())


@pytest.mark.parametrize("loader_sets_epoch", [True, False])
def test_length_grouped_training_resumes_on_the_batches_it_would_have_trained_on(tiny, tmp_path, monkeypatch,
                                                                                 loader_sets_epoch):
    """`group_by_length`: a dSFT run of 2 epochs stopped at a checkpoint in its second epoch and resumed by the
    Trainer (its skipped batches) trains on exactly the batches of the uninterrupted run; both epochs hold
    every example once, in other orders, in batches of similar lengths. Also where accelerate's data loader
    does not pass its epoch on to the sampler, as under a resumed multi-process run."""
    from accelerate.data_loader import DataLoaderShard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not loader_sets_epoch:
        monkeypatch.setattr(DataLoaderShard, "set_epoch", lambda self, epoch: None)

    from dadpo.recover.batching import example_length
    from dadpo.recover.training import build_trainer

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    exs = [encode_example(tok, str(i), [{"role": "user", "content": "Tell me" + " more" * (i * 7 % 24)}],
                          "Yes" + " and yes" * (i % 5), None, 64, 16) for i in range(24)]
    length = {ex["id"]: example_length(ex) for ex in exs}
    cfg = RecoverConfig.parse({"method": "dsft", "batch_size": 2, "group_by_length": True, "save_steps": 1,
                               "dsft": {"epochs": 2, "lr": 1e-3}})

    def batches_seen(ckpt, resume=None, **overrides):
        trainer = build_trainer(AutoModelForCausalLM.from_pretrained(tiny["student"]), tok, exs, cfg, "dsft",
                                ckpt, **overrides)
        seen, collate = [], trainer.data_collator
        trainer.data_collator = lambda batch: seen.append([ex["id"] for ex in batch]) or collate(batch)
        trainer.train(resume_from_checkpoint=resume)
        return seen

    straight = batches_seen(tmp_path / "straight")
    assert len(straight) == 24
    epochs = [sorted(i for b in straight[e * 12:(e + 1) * 12] for i in b) for e in (0, 1)]
    assert epochs[0] == epochs[1] == sorted(length) and straight[:12] != straight[12:]
    spread = sum(max(length[i] for i in b) - min(length[i] for i in b) for b in straight) / 24
    assert spread < (max(length.values()) - min(length.values())) / 4
    batches_seen(tmp_path / "killed", max_steps=15)
    assert batches_seen(tmp_path / "killed", resume=str(tmp_path / "killed" / "checkpoint-15")) == straight[15:]


def test_length_ordered_scoring_keeps_every_result_with_its_example(tiny):
    """`group_by_length` scores in length order: each example's log-probs equal those of a pass in the given
    order, only the training pairs (the first `n_topk`) get teacher top-k, and the held-out pairs' per-pair u
    comes back in the examples' order."""
    from transformers import AutoTokenizer

    from dadpo.recover.heldout import heldout_pairs
    from dadpo.recover.scoring import sequence_scores

    tok = AutoTokenizer.from_pretrained(tiny["student"])
    exs = [encode_example(tok, str(i), [{"role": "user", "content": "Tell me" + " more" * (i * 5 % 11)}],
                          "Yes" + " and yes" * (i % 4), "No" + " no" * (i * 3 % 5), 64, 16) for i in range(8)]
    cfg = {g: RecoverConfig.parse({"method": "dadpo", "batch_size": 3, "group_by_length": g,
                                   "kd": {"weight": 0.5, "top_k": 4}}) for g in (False, True)}
    scored = {g: sequence_scores(tiny["teacher"], exs, cfg[g], "teacher", n_topk=5) for g in cfg}
    for i, ex in enumerate(exs):
        a, b = scored[False][ex["id"]], scored[True][ex["id"]]
        for k in ("teacher_chosen_logps", "teacher_rejected_logps"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), (i, k)
        assert ("topk_ids" in a) == ("topk_ids" in b) == (i < 5), i
        if i < 5:
            assert b["topk_logps"].shape == (len(ex["chosen_ids"]), 4)
            assert torch.allclose(b["topk_logps"], a["topk_logps"], atol=1e-5)
    scores = {k: {**v, **{f"ref_{n}": v[f"teacher_{n}"] for n in ("chosen_logps", "rejected_logps")}}
              for k, v in scored[False].items()}
    u = {g: heldout_pairs(tiny["student"], exs, scores, cfg[g])["u"] for g in cfg}
    assert u[True] == pytest.approx(u[False], rel=1e-4) and len({round(x, 3) for x in u[False]}) > 4


# --- the pipeline on tiny models -----------------------------------------------------------------------------

def test_pipeline_end_to_end_lora_with_kd_and_resume_guards(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = {**TINY_CFG, "method": "dadpo", "kd": {"weight": 0.5, "top_k": 4}, "report_to": "tensorboard",
           "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    metrics = run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], out, cfg)
    assert {"start", "dsft", "final"} <= set(metrics) and metrics["final"]["pairs"] == 2
    start, end = metrics["teacher_term"]["start"], metrics["teacher_term"]["end"]  # the teacher term's effect
    assert start["pairs"] == 6 and start["margin_ref"] == 0.0 and end["pairs"] == 2 and 0 <= end["saturated"] <= 1
    term = json.loads((out / "teacher_term.json").read_text())  # per-pair u behind the stats, and their plot
    assert (len(term["u"]["start"]), len(term["u"]["end"]), term["beta2"], term["margin"]) == (6, 2, 0.1, "sum")
    assert sum(term["u"]["start"]) / 6 == pytest.approx(start["u_mean"]) and "u" not in metrics["final"]
    assert (out / "teacher_term.png").stat().st_size > 10_000
    assert (out / "training_curves.png").stat().st_size > 10_000  # loss, margins, accuracies, KD per step
    for stage in ("dsft", "train"):  # tensorboard event files survive the checkpoints' removal
        assert list((out / stage / "tb").glob("events.out.tfevents.*")), stage
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # plain model, LoRA merged in
    assert not any("lora" in n for n, _ in merged.named_parameters())
    scores = torch.load(out / "scores.pt", weights_only=True)
    assert len(scores) == 8 and scores["3"]["topk_ids"].shape[1] == 4
    hist = json.loads((out / "train" / "log_history.json").read_text())
    assert any("kd" in h and "margin_ref" in h for h in hist)
    assert not (out / "train" / "checkpoints").exists()
    # rerun: complete, nothing redone; other settings: refused naming the field
    assert run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], out, cfg) == metrics
    with pytest.raises(DadpoError, match=r"other settings \(config\.beta1\)"):
        run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], out, {**cfg, "beta1": 0.5})
    # a sibling run with another method links the shared work instead of redoing it
    other = tmp_path / "dpo"
    m2 = run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], other,
                     {**cfg, "method": "dpo", "margin": "mean"}, reuse=[out])
    for name in ("teacher.jsonl", "dsft", "student.jsonl", "scores.pt"):
        assert (other / name).is_symlink(), name
    assert m2["dsft"] == metrics["dsft"] and m2["final"]["nll"] != metrics["final"]["nll"]
    assert json.loads((other / "teacher_term.json").read_text())["beta2"] == 0.0  # dDPO: u = β1·Δ_ref
    m3 = run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], tmp_path / "kd",
                     {**cfg, "method": "kd", "kd": {"kind": "jsd", "top_k": 4}}, reuse=[out, other])
    assert (tmp_path / "kd" / "scores.pt").is_symlink() and "reward_acc" not in m3["final"]
    hist = json.loads((tmp_path / "kd" / "train" / "log_history.json").read_text())
    assert any("kd" in h for h in hist) and not any("margin_ref" in h for h in hist)
    with pytest.raises(DadpoError, match="not a recover run"):
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "x").write_text("x")
        run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], tmp_path / "junk", cfg)


def test_dsft_run_killed_after_its_model_copy_resumes_and_a_rewritten_teacher_is_another_run(tiny, tmp_path):
    import shutil

    teacher = shutil.copytree(tiny["teacher"], tmp_path / "teacher")
    out = tmp_path / "run"
    cfg = {**TINY_CFG, "method": "dsft"}
    metrics = run_recover(tiny["student"], str(teacher), tiny["prompts"], out, cfg)
    (out / "metrics.json").unlink()  # killed after model/ was copied, before metrics.json
    assert run_recover(tiny["student"], str(teacher), tiny["prompts"], out, cfg) == metrics
    _tiny_model(teacher, Path(tiny["teacher"]), seed=7)  # the same path now holds other weights
    with pytest.raises(DadpoError, match=r"other settings \(teacher\)"):
        run_recover(tiny["student"], str(teacher), tiny["prompts"], out, cfg)


def test_held_out_pairs_scored_in_the_cached_scores_precision(tiny, tmp_path):
    """bf16: π_ref/π_te are cached under autocast, so the held-out policy scores must be too; with a
    learning rate too small to move any fp32 weight the final model is π_ref and Δ_ref is exactly 0."""
    cfg = {**TINY_CFG, "method": "dpo", "bf16": True, "lr": 1e-12}
    final = run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], tmp_path / "run", cfg)["final"]
    assert final["pairs"] == 2 and final["margin_ref"] == 0.0 and final["reward_acc"] == 0.0


def test_held_out_nll_per_prompt_does_not_depend_on_the_batch_and_pools_to_the_run_figure(tiny):
    """Each prompt's summed NLL is that prompt's alone (batches of 1 and 3, other padding, agree), in the
    records' order, and the run's pooled held-out NLL is their token-weighted mean."""
    from dadpo.data import load_prompts
    from dadpo.recover.heldout import heldout_nll, heldout_prompt_nll

    records = load_prompts(tiny["prompts"])[:5]
    answers = {r.id: "It is " + " and ".join(["large"] * (int(r.id) + 1)) + "." for r in records}
    cfg = {b: RecoverConfig.parse({**TINY_CFG, "batch_size": b}) for b in (1, 3)}
    one, three = (heldout_prompt_nll(tiny["student"], records, answers, cfg[b]) for b in (1, 3))
    assert list(three) == [r.id for r in records]
    assert all(three[i][1] == one[i][1] and three[i][0] == pytest.approx(one[i][0], rel=1e-5) for i in one)
    assert len({n for _, n in one.values()}) > 1  # responses of different lengths: padding really differs
    grouped = heldout_prompt_nll(tiny["student"], records, answers,
                                 RecoverConfig.parse({**TINY_CFG, "batch_size": 3, "group_by_length": True}))
    assert list(grouped) == list(three)  # scored in length order, returned in the records' order
    assert all(grouped[i][1] == one[i][1] and grouped[i][0] == pytest.approx(one[i][0], rel=1e-5) for i in one)
    pooled = heldout_nll(tiny["student"], records, answers, cfg[3])
    assert pooled["tokens"] == sum(n for _, n in one.values())
    assert pooled["nll"] == pytest.approx(sum(s for s, _ in one.values()) / pooled["tokens"], rel=1e-6)


def _cli(tiny, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "dadpo", "recover", "--student", tiny["student"], "--teacher", tiny["teacher"],
            "--prompts", tiny["prompts"], "--out", str(out), "--method", method, "--train-prompts", "8",
            "--eval-prompts", "2", "--batch-size", "1", "--save-steps", "2", "--max-new-tokens", "8",
            "--max-response-len", "16", "--lr", "1e-3", "--dsft-lr", "1e-3", "--epochs", "3"]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_metrics(tiny, tmp_path):
    """SIGKILL the daDPO stage after its first checkpoints, rerun the same command: it resumes from the last
    checkpoint (not from scratch) and ends with the uninterrupted run's metrics (abs tol 1e-4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref_out, out = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(tiny, ref_out, "dadpo"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(tiny, out, "dadpo"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = out / "train" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpts.is_dir() and len(list(ckpts.glob("checkpoint-*"))) and
               any(int(p.name.split("-")[1]) >= 6 for p in ckpts.glob("checkpoint-*"))):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()  # killed mid-training (24 steps in all)
    res = subprocess.run(_cli(tiny, out, "dadpo"), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr
    a = json.loads((ref_out / "metrics.json").read_text())["final"]
    b = json.loads((out / "metrics.json").read_text())["final"]
    for k in ("nll", "margin_ref", "margin_te", "reward_acc", "objective_acc"):
        assert b[k] == pytest.approx(a[k], abs=1e-4), k


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(tiny, mode):
    from transformers import AutoModelForCausalLM

    from dadpo.recover.forward import response_logps
    from dadpo.recover.trainer import enable_checkpointing

    ids = torch.randint(0, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :8] = -100
    grads = []
    for m in ("none", mode):
        model = AutoModelForCausalLM.from_pretrained(tiny["student"]).train()
        enable_checkpointing(model, m)
        (-response_logps(model, ids, torch.ones_like(ids), labels).sums.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


# --- devices -------------------------------------------------------------------------------------------------

def test_scoring_and_held_out_batches_go_to_the_models_device(smollm):
    """Every tensor a scoring or held-out batch holds (token ids and cached π_ref/π_te scores alike) is put
    on the device passed (the model's), so a model on cuda never meets a cpu batch."""
    from dadpo.recover.scoring import batches

    _, tok = smollm
    exs = [encode_example(tok, str(i), [{"role": "user", "content": "Hi"}], "Hello.", "Go away.", 32, 16)
           for i in range(3)]
    for ex in exs:
        ex.update(ref_chosen_logps=-1.0, ref_rejected_logps=-2.0, teacher_chosen_logps=-1.5,
                  teacher_rejected_logps=-2.5)
    sizes = []
    for chunk, batch in batches(exs, 2, tok.pad_token_id, "test", torch.device("meta")):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        assert {"input_ids", "labels", "ref_chosen_logps", "teacher_rejected_logps"} <= set(tensors)
        assert {v.device.type for v in tensors.values()} == {"meta"}
        sizes.append(len(chunk))
    assert sizes == [2, 1]


@pytest.mark.gpu
def test_pipeline_on_cuda(tiny, tmp_path):
    """The tiny daDPO run end to end with every model on cuda (dSFT, sampling, scoring, training, held-out
    metrics); only where CUDA is present."""
    from dadpo.models import load_model

    assert load_model(tiny["student"])[0].device.type == "cuda"
    metrics = run_recover(tiny["student"], tiny["teacher"], tiny["prompts"], tmp_path / "run",
                          {**TINY_CFG, "method": "dadpo", "bf16": True})
    assert metrics["final"]["pairs"] == 2 and metrics["teacher_term"]["end"]["pairs"] == 2
    assert all(torch.isfinite(torch.tensor(metrics["final"][k])) for k in ("nll", "margin_ref", "margin_te"))
