"""export: saved non-uniform prunes load without dadpo (self-contained HF folders with their modelling
code), checked in a fresh virtual environment that has torch + transformers and no dadpo."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dadpo.models import load_tokenizer
from dadpo.prune import prune_to_dir
from test_prune import fast_config, tiny_model

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Name three colours."]

#: loads DIR without dadpo (trust_remote_code); prints last-position logits of PROMPTS and a cached
#: greedy continuation of the first
PLAIN_LOAD = """
import importlib.util, json, sys, torch
assert importlib.util.find_spec("dadpo") is None
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(path)
with torch.no_grad():
    logits = [model(**tok(p, return_tensors="pt")).logits[0, -1].tolist() for p in prompts]
    out = model.generate(**tok(prompts[0], return_tensors="pt"), max_new_tokens=8, do_sample=False, use_cache=True)
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "logits": logits,
                  "greedy": out[0].tolist(), "mlp": [l.mlp.gate_proj.out_features for l in model.model.layers]}))
"""


def load_without_dadpo(python, path, tmp_path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([python, "-c", PLAIN_LOAD, str(path), json.dumps(PROMPTS)], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_with_dadpo(path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()  # no remote code: dadpo's own classes
    tok = load_tokenizer(str(path))
    with torch.no_grad():
        logits = [model(**tok(p, return_tensors="pt")).logits[0, -1] for p in PROMPTS]
        out = model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=8, do_sample=False)
    return {"class": type(model).__module__, "logits": torch.stack(logits), "greedy": out[0].tolist()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_non_uniform_prune_loads_without_dadpo(tmp_path, plain_venv, family):
    tok = load_tokenizer("smollm2-135m-instruct")
    src = tmp_path / "src"
    tiny_model(family, tok).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "pruned"
    report = prune_to_dir(str(src), out, fast_config(allocation="global", targets="both", layers="1:3"))
    assert not report["uniform"]
    cfg = json.loads((out / "config.json").read_text())
    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_dadpo_pruned.DadpoPruned{name}Config",
                               "AutoModelForCausalLM": f"modeling_dadpo_pruned.DadpoPruned{name}ForCausalLM"}
    assert (out / "modeling_dadpo_pruned.py").is_file()

    plain, ours = load_without_dadpo(plain_venv, out, tmp_path), load_with_dadpo(out)
    assert plain["class"].startswith("transformers_modules.") and ours["class"].startswith("dadpo.prune.")
    assert plain["mlp"] == cfg["layer_intermediate_sizes"] and len(set(plain["mlp"])) > 1
    assert (torch.tensor(plain["logits"]) - ours["logits"]).abs().max() <= 1e-5
    assert plain["greedy"] == ours["greedy"]


def test_recovered_non_uniform_student_loads_without_dadpo(tmp_path, plain_venv):
    """The recover stage's output (LoRA merged back into the pruned student) is self-contained too."""
    from dadpo.recover import run_recover

    tok = load_tokenizer("smollm2-135m-instruct")
    teacher = tmp_path / "teacher"
    tiny_model("llama", tok).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    student = tmp_path / "student"
    prune_to_dir(str(teacher), student, fast_config(allocation="global", targets="both", layers="1:3"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say a word about {i}.", "id": str(i)}) + "\n" for i in range(4)))
    cfg = {"method": "dsft", "train_prompts": 3, "eval_prompts": 1, "batch_size": 2, "max_prompt_len": 32,
           "max_response_len": 8, "sampling": {"max_new_tokens": 8, "batch_size": 4},
           "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    run_recover(str(student), str(teacher), str(prompts), tmp_path / "run", cfg)
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "modeling_dadpo_pruned.py").is_file()
    plain, ours = load_without_dadpo(plain_venv, model_dir, tmp_path), load_with_dadpo(model_dir)
    assert (torch.tensor(plain["logits"]) - ours["logits"]).abs().max() <= 1e-5
    assert plain["greedy"] == ours["greedy"]


def test_uniform_prune_carries_no_custom_code(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    src = tmp_path / "src"
    tiny_model("llama", tok, heads=4, kv=2).save_pretrained(src)
    tok.save_pretrained(src)
    report = prune_to_dir(str(src), tmp_path / "pruned", fast_config())
    assert report["uniform"]
    assert "auto_map" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert not list((tmp_path / "pruned").glob("*.py"))
