"""The GPU recipes' first steps, and a resumable pipeline run, on tiny stand-in models (slow: real training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import free_port
from dadpo.pipeline import MANIFEST, plan, run_recipe
from dadpo.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.slow


def tiny(path: Path, tok, family: str = "llama", layers: int = 2, hidden: int = 64, mlp: int = 256) -> str:
    """A random-init chat model of a real architecture with the SmolLM2 tokenizer (a stand-in for 7B).
    Its 49k-token embedding dominates, so a wide MLP leaves 20% of all parameters prunable."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=True)
    model_cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


SMALL = ["prune.calib_samples=4", "prune.ppl_max_windows=2", "prune.layers=null", "prune.sample_max_new_tokens=4",
         "recover.train_prompts=4", "recover.eval_prompts=2", "recover.batch_size=2", "recover.grad_accum=1",
         "recover.max_prompt_len=32", "recover.max_response_len=16", "recover.sampling.max_new_tokens=8",
         "recover.sampling.batch_size=4", "recover.bf16=false", "recover.dsft.epochs=1", "evaluate=null"]


@pytest.mark.parametrize("recipe", ["vicuna7b-prune20-dadpo.yaml", "qwen2.5-1.5b-from-7b-dadpo.yaml"])
def test_gpu_recipe_first_steps_on_tiny_stand_in(recipe, tmp_path, smollm, data_aliases):
    _, tok = smollm
    family = "qwen2" if recipe.startswith("qwen") else "llama"
    teacher = tiny(tmp_path / "teacher", tok, family, layers=4, hidden=128, mlp=2048)
    sets = [f"output_dir={tmp_path / 'run'}", f"teacher={teacher}", *SMALL]
    if family == "qwen2":
        sets += [f"student={tiny(tmp_path / 'student', tok, family, layers=2, hidden=32)}"]
        sets = [s for s in sets if not s.startswith("prune.")]
    r = load_recipe(RECIPES / recipe, sets)
    results = run_recipe(r, echo=lambda s: None)
    assert [s.name for s in plan(r)] == (["prune", "recover"] if family == "llama" else ["recover"])
    model_dir = tmp_path / "run" / "recover" / "model"
    assert (model_dir / "config.json").is_file() and results["recover"]["method"] == "dadpo"
    if family == "llama":
        assert abs(results["prune"]["ratio_achieved"] - 0.2) <= 0.005
    for stage in results:
        assert json.loads((tmp_path / "run" / stage / MANIFEST).read_text())["stage"] == stage


def test_bench_on_tiny_models_then_rerun_skips_everything(tmp_path, smollm, data_aliases, capsys):
    """`dadpo bench` end to end (prune → dsft/dadpo and a daDPO variant sharing work → evaluate → table), then a
    no-op rerun."""
    import yaml

    from dadpo.cli import main

    _, tok = smollm
    teacher = tiny(tmp_path / "teacher", tok, "llama", layers=4, hidden=128, mlp=2048)
    small = [s for s in SMALL if s != "evaluate=null"] + [
        f"teacher={teacher}", f"output_dir={tmp_path / 'run'}", "prune.layers=null", "evaluate.sets=[vicuna_bench]",
        "evaluate.limit=2", "evaluate.generation.max_new_tokens=4", f"evaluate.judge.model={teacher}",
        "evaluate.tasks=[arc_easy]", "evaluate.task_limit=4", "evaluate.bootstrap=50"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text((RECIPES / "smollm2-135m-prune20-dadpo.yaml").read_text())
    methods = "none,dsft,dadpo,dadpo@beta2=0.01@margin=mean"
    args = ["bench", str(recipe), "--methods", methods, *[a for s in small for a in ("--set", s)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    bench = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())
    variant = "dadpo@beta2=0.01@margin=mean"
    assert [r["method"] for r in bench["rows"]] == ["teacher", "none", "dsft", "dadpo", variant]
    assert all(r["preference"] is not None and r["zeroshot_tasks"] == 1 for r in bench["rows"][1:])
    assert (tmp_path / "run" / "bench" / "preference.png").stat().st_size > 1000
    assert "| dadpo |" in out and "| dadpo |" in (tmp_path / "run" / "bench" / "table.md").read_text()
    assert (tmp_path / "run" / "bench" / "recover-dadpo" / "dsft").exists()  # linked from the dsft run
    for shared in ("dsft", "teacher.jsonl", "student.jsonl", "scores.pt"):  # the variant trains, nothing else
        assert (tmp_path / "run" / "bench" / f"recover-{variant}" / shared).is_symlink(), shared
    metrics = json.loads((tmp_path / "run" / "bench" / f"recover-{variant}" / "metrics.json").read_text())
    manifest = json.loads((tmp_path / "run" / "bench" / f"recover-{variant}" / "recover.json").read_text())
    assert manifest["config"]["margin"] == "mean" and manifest["config"]["beta2"] == 0.01
    assert metrics["teacher_term"]["start"]["pairs"] == 4
    assert main(args) == 0
    assert capsys.readouterr().out.count("up to date") == 5  # prune, 3 recovers, evaluate
    assert yaml.safe_load(recipe.read_text())["name"] == "smollm2-135m-prune20-dadpo"


def test_run_killed_during_recover_resumes_without_redoing_prune_or_generation(tmp_path, smollm, data_aliases):
    """`dadpo run`, SIGKILLed while recover trains, then the same command (refused while the first one lives):
    prune is skipped, teacher and student answers are not regenerated, training resumes from its checkpoint,
    and the final metrics equal an uninterrupted run's (abs tol 1e-4)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, tok = smollm
    teacher = tiny(tmp_path / "teacher", tok, "llama", layers=4, hidden=128, mlp=2048)
    sets = [*SMALL, f"teacher={teacher}", "recover.train_prompts=8", "recover.batch_size=1", "recover.epochs=3",
            "recover.save_steps=2", "recover.lr=1e-3"]

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "dadpo", "run", str(RECIPES / "smollm2-135m-prune20-dadpo.yaml"),
                "--out", str(out), *[a for s in sets for a in ("--set", s)]]

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd(tmp_path / "straight"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "recover" / "train" / "checkpoints"
    deadline = time.time() + 900
    while not any(int(p.name.split("-")[1]) >= 6 for p in ckpts.glob("checkpoint-*")):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGSTOP)  # paused, it still holds its output: the same command is refused meanwhile
    second = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert second.returncode == 2 and f"is in use by another dadpo run (pid {proc.pid} on " in second.stderr, \
        second.stderr[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "recover" / MANIFEST).exists()  # recover was not finished (24 daDPO steps in all)
    made = {p: p.stat().st_mtime_ns for p in [out / "prune" / MANIFEST, out / "prune" / "model" / "config.json",
                                              out / "recover" / "teacher.jsonl", out / "recover" / "student.jsonl"]}
    res = subprocess.run(cmd(out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prune: up to date" in res.stdout and "recover: resuming" in res.stdout, res.stdout
    assert "resuming from" in res.stderr and "checkpoint-" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in made} == made  # nothing upstream of training was redone
    a = json.loads((tmp_path / "straight" / "recover" / "metrics.json").read_text())
    b = json.loads((out / "recover" / "metrics.json").read_text())
    assert b["start"]["nll"] == a["start"]["nll"] and b["dsft"]["nll"] == a["dsft"]["nll"]
    for k in ("nll", "margin_ref", "margin_te", "reward_acc", "objective_acc"):
        assert b["final"][k] == pytest.approx(a["final"][k], abs=1e-4), k


def _answers(run: Path) -> dict[str, list[dict]]:
    """A run's answer files (recover's and evaluate's), by path without the model folders' spec hash, each
    row without its model stamp (which names the run's own folder)."""
    import re

    files = [*run.glob("recover/*.jsonl"), *run.glob("evaluate/answers/*/*.jsonl")]
    return {re.sub(r"-[0-9a-f]{8}/", "/", str(p.relative_to(run))):
            [{k: v for k, v in json.loads(line).items() if k != "model"} for line in p.read_text().splitlines()]
            for p in files}


def test_recipe_with_two_processes_matches_one_process_and_resumes_after_a_kill(tmp_path, smollm, data_aliases):
    """`dadpo run` of the demo recipe on a tiny model under torchrun with two CPU processes (gloo) writes what
    one process writes: the same answers, scores and held-out metrics, training losses within 1e-4 at the same
    global batch (`recover.batch_size` is per process), one record per stage. SIGKILLed while answering, the
    same command resumes and ends with the same files. One thread per process in both (torchrun's default):
    matmuls on another number of threads may differ in the last bit. Recover's answers are greedy here: a
    student trained by DDP differs from one trained in one process in the last bits (the processes' gradients
    are summed in another order), and sampling from this random model's nearly flat distribution turns any
    such difference into other tokens; sampled answers are compared where the weights are the same (the
    teacher and the prune)."""
    import os
    import subprocess
    import sys
    import time

    _, tok = smollm
    teacher = tiny(tmp_path / "teacher", tok, "llama", layers=4, hidden=128, mlp=2048)
    sets = [s for s in SMALL if s != "evaluate=null"] + [
        f"teacher={teacher}", "recover.train_prompts=48", "recover.eval_prompts=4",
        "recover.sampling.max_new_tokens=24", "recover.sampling.batch_size=2", "recover.sampling.temperature=0",
        "recover.lr=1e-3", "evaluate.sets=[dolly]", "evaluate.limit=4", "evaluate.seeds=[1,2]",
        "evaluate.judge=null", "evaluate.tasks=[]", "evaluate.generation.max_new_tokens=8",
        "evaluate.ppl_max_windows=2", "evaluate.bootstrap=50"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cmd(out: Path, processes: int) -> list[str]:
        launch = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
        per_process = [f"recover.batch_size={4 // processes}"]  # the global batch: 4 prompts a step
        return [*launch, "-m", "dadpo", "run", str(RECIPES / "smollm2-135m-prune20-dadpo.yaml"), "--out", str(out),
                *[a for s in [*sets, *per_process] for a in ("--set", s)]]

    def run(out: Path, processes: int) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd(out, processes), env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    one, two = tmp_path / "one", tmp_path / "two"
    run(one, 1)
    r = run(two, 2)
    assert "rank 0 of 2" in r.stderr and "rank 1 of 2" in r.stderr  # really two processes
    for stage in ("prune", "recover", "evaluate"):  # the runner's records, by one process
        assert r.stdout.count(f"{stage}: done in") == 1
        assert json.loads((two / stage / MANIFEST).read_text())["stage"] == stage
    assert r.stdout.count("summary:") == 1
    expected, got = _answers(one), _answers(two)
    assert len(expected) == 2 + 3 * 2 and got.keys() == expected.keys()  # teacher/student; 3 models × 2 seeds
    trained = [k for k in expected if "answers/dadpo/" in k]  # sampled from a student trained by DDP
    assert len(trained) == 2 and all(got[k] == expected[k] for k in expected if k not in trained)
    assert all([x["id"] for x in got[k]] == [x["id"] for x in expected[k]] for k in trained)
    assert not [p for p in two.rglob("*") if ".part" in p.name or p.name.endswith(".tmp")]
    a = json.loads((one / "recover" / "metrics.json").read_text())
    b = json.loads((two / "recover" / "metrics.json").read_text())
    assert b["start"]["nll"] == pytest.approx(a["start"]["nll"], abs=1e-5)  # batches of 2, not 4: other padding
    for k in ("nll", "margin_ref", "margin_te", "reward_acc"):
        assert b["final"][k] == pytest.approx(a["final"][k], abs=1e-4), k
    sa, sb = (torch.load(x / "recover" / "scores.pt", weights_only=True) for x in (one, two))
    assert sa.keys() == sb.keys() and all(sb[k] == pytest.approx(sa[k], abs=1e-4) for k in sa)
    for stage in ("dsft", "train"):  # the same global batch: one process's 4 rows = two processes' 2 + 2
        la, lb = (json.loads((x / "recover" / stage / "log_history.json").read_text()) for x in (one, two))
        losses = [(x["loss"], y["loss"]) for x, y in zip(la, lb, strict=True) if "loss" in x]
        assert len(losses) == 12 and all(x == pytest.approx(y, abs=1e-4) for x, y in losses), (stage, losses)

    # SIGKILL the two-process run while it answers the training prompts, then the same command
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    parts = killed / "recover"
    deadline = time.time() + 600
    while sum(len(p.read_text().splitlines()) for p in parts.glob("teacher.jsonl.part.*")) < 6:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    _kill_torchrun(proc)
    assert not (parts / "teacher.jsonl").exists()  # killed during generation
    r = run(killed, 2)
    assert "prune: up to date" in r.stdout and "recover: resuming" in r.stdout
    assert _answers(killed) == got  # the trained student too: two processes train the same way every time


def _kill_torchrun(proc) -> None:
    """SIGKILL `torchrun` and its workers and wait until they are gone. torchrun starts each worker in a
    session of its own, so killing torchrun's process group alone leaves the workers running: they would
    finish the killed job beside the resumed one, in the same folder."""
    import contextlib
    import os
    import signal
    import time

    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.kill()
    proc.wait()

    def alive(w) -> bool:
        try:
            return w.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 60
    while any(alive(w) for w in workers):
        assert time.time() < deadline, "torchrun's workers outlived SIGKILL"
        time.sleep(0.05)


def test_bench_with_two_processes(tmp_path, smollm, data_aliases):
    """`dadpo bench` under torchrun with two processes: the shared work is linked between methods, token KD's
    teacher top-k is scored across both processes, the judge and the table run once."""
    import os
    import subprocess
    import sys

    _, tok = smollm
    teacher = tiny(tmp_path / "teacher", tok, "llama", layers=4, hidden=128, mlp=2048)
    sets = [s for s in SMALL if s != "evaluate=null"] + [
        f"teacher={teacher}", f"output_dir={tmp_path / 'run'}", "recover.batch_size=1", "evaluate.sets=[dolly]",
        "evaluate.limit=2", "evaluate.seeds=[1]", "evaluate.generation.max_new_tokens=4",
        f"evaluate.judge.model={teacher}", "evaluate.judge.sets=[dolly]", "evaluate.tasks=[]",
        "evaluate.ppl_max_windows=2", "evaluate.bootstrap=50"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "-m", "dadpo", "bench",
                        str(RECIPES / "smollm2-135m-prune20-dadpo.yaml"), "--methods", "none,dsft,kd,dadpo",
                        *[a for s in sets for a in ("--set", s)]],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1 of 2" in r.stderr and r.stdout.count("| kd |") == 1  # the table, printed once
    bench = tmp_path / "run" / "bench"
    rows = json.loads((bench / "bench.json").read_text())["rows"]
    assert [x["method"] for x in rows] == ["teacher", "none", "dsft", "kd", "dadpo"]
    assert all(x["preference"] is not None for x in rows[1:])  # judged (on the main process)
    assert (bench / "recover-dadpo" / "dsft").is_symlink() and (bench / "recover-kd" / "teacher.jsonl").is_symlink()
    scores = torch.load(bench / "recover-kd" / "scores.pt", weights_only=True)
    topk = [s["topk_ids"] for s in scores.values() if "topk_ids" in s]  # the 4 training pairs' teacher top-k
    assert len(scores) == 6 and len(topk) == 4 and all(t.shape[-1] == 20 for t in topk)
    assert not [p for p in tmp_path.rglob("*") if ".part" in p.name or p.name.endswith(".tmp")]
