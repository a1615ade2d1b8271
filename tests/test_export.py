"""export: saved non-uniform prunes load without dadpo (self-contained HF folders with their modelling code,
checked in a fresh virtual environment that has torch + transformers and no dadpo), and `dadpo export`'s
GGUF runs in a real llama.cpp (llama-cpp-python built from source by `make setup`) like transformers does."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import run_cli
from dadpo.models import load_tokenizer
from dadpo.prune import prune_to_dir
from test_prune import fast_config, save_tiny

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
    src = save_tiny(tmp_path, tok, family)
    out = tmp_path / "pruned"
    report = prune_to_dir(str(src), out, fast_config(allocation="global", targets="both", layers="1:3"))
    assert not report["uniform"]
    cfg = json.loads((out / "config.json").read_text())
    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_dadpo_pruned.DadpoPruned{name}Config",
                               "AutoModelForCausalLM": f"modeling_dadpo_pruned.DadpoPruned{name}ForCausalLM"}
    assert (out / "modeling_dadpo_pruned.py").is_file()

    plain, ours = load_without_dadpo(plain_venv, out, tmp_path), load_with_dadpo(out)
    assert plain["class"].startswith("transformers_modules.") and ours["class"].startswith("dadpo.")
    assert plain["mlp"] == cfg["layer_intermediate_sizes"] and len(set(plain["mlp"])) > 1
    assert (torch.tensor(plain["logits"]) - ours["logits"]).abs().max() <= 1e-5
    assert plain["greedy"] == ours["greedy"]


def test_recovered_non_uniform_student_loads_without_dadpo(tmp_path, plain_venv):
    """The recover stage's output (LoRA merged back into the pruned student) is self-contained too."""
    from dadpo.recover import run_recover

    tok = load_tokenizer("smollm2-135m-instruct")
    teacher = save_tiny(tmp_path, tok, "llama")
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
    src = save_tiny(tmp_path, tok, "llama", heads=4, kv=2)
    report = prune_to_dir(str(src), tmp_path / "pruned", fast_config())
    assert report["uniform"]
    assert "auto_map" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert not list((tmp_path / "pruned").glob("*.py"))


# ---------------------------------------------------------------- GGUF in a real llama.cpp runtime


@pytest.fixture(scope="module")
def smollm_prune(tmp_path_factory, smollm_dir, data_dir):
    """A demo-style non-uniform prune of SmolLM2-135M-Instruct: 20% of the MLP channels of layers 3:29 by
    Taylor importance with reconstruction (fewer calibration prompts than the demo), in widths that are not
    multiples of 32."""
    out = tmp_path_factory.mktemp("smollm-prune") / "model"
    cfg = fast_config(ratio=0.2, targets="mlp", layers="3:29", importance="taylor", reconstruct=True,
                      calib_samples=8, calib_max_len=64, mlp_round_to=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DADPO_DATA_DIR", str(data_dir))  # calibration prompts: Dolly's, from the test data
        report = prune_to_dir(str(smollm_dir), out, cfg.model_copy(update={"calib_skip": 300}))
    assert not report["uniform"]
    return out


def llama_cpp_model(path, **kw):
    """llama.cpp on `path` with an f32 KV cache (its default f16 cache alone moves log-probs by ~0.05) and
    without CPU weight repacking (`llama-server --no-repack`): in this llama.cpp the AMX repacked path of
    Intel CPUs segfaults on quantized matrices for batches of more than one token, upstream's own
    SmolLM2 Q4_1 GGUF included, so it would test the CPU, not the file."""
    from unittest import mock

    import gguf
    import llama_cpp
    from llama_cpp import Llama

    defaults = llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    f32 = int(gguf.GGMLQuantizationType.F32)
    with mock.patch.object(llama_cpp.llama.llama_cpp, "llama_model_default_params", no_repack):
        return Llama(model_path=str(path), n_ctx=512, n_batch=512, logits_all=True, n_threads=2, seed=0,
                     type_k=f32, type_v=f32, verbose=False, **kw)


def next_token_logprobs(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.log_softmax(torch.tensor(llm.scores[len(ids) - 1], dtype=torch.float64), -1)


def greedy(llm, ids: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    """llama.cpp's greedy continuation (KV cache), at most `n` tokens, ending after a `stop` token."""
    llm.reset()
    out = []
    llm.eval(ids)
    while len(out) < n and not (out and out[-1] in stop):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval(out[-1:])
    return out


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


@pytest.fixture(scope="module")
def hf_prune(smollm_prune):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_prune).eval(), load_tokenizer(str(smollm_prune))


def agree_greedily(llm, model, ids: list[int], n: int, tie: float) -> bool:
    """Whether llama.cpp's greedy continuation equals transformers' (both with KV caches, both ending at the
    end-of-turn token). They may part only where transformers' two most likely tokens are within `tie`
    nats (a tie at the export's precision), and then this returns False."""
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    ours = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)
    theirs, ours_ids = greedy(llm, ids, n, stop), ours.sequences[0, len(ids):].tolist()
    for k, (a, b) in enumerate(zip(theirs, ours_ids, strict=False)):
        if a != b:
            top2 = ours.scores[k][0].float().log_softmax(-1).topk(2).values
            assert top2[0] - top2[1] < tie, f"token {k}: llama.cpp {a}, transformers {b}"
            return False
    assert len(theirs) == len(ours_ids)
    return True


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_of_the_prune_matches_transformers_in_llama_cpp(smollm_prune, hf_prune, tmp_path, outtype, capsys):
    """f32: every next-token log-prob within 1e-3 (measured ~1e-4). f16 (output layer kept f32): within 1e-2
    for tokens transformers gives p ≥ 1e-2 (measured ≤ 0.007); llama.cpp also rounds activations to f16 in
    its f16 matmuls, which moves the log-probs of unlikely tokens by a few 1e-2, so every token is bounded
    by 5e-2 (measured ≤ 0.03). Greedy continuations of 16 tokens agree."""
    import gguf

    out = tmp_path / f"prune-{outtype}.gguf"
    code, stdout, err = run_cli(capsys, "export", str(smollm_prune), "--gguf", str(out), "--outtype", outtype)
    assert code == 0, err
    assert "arch deci" in stdout
    fields = gguf.GGUFReader(out).fields
    widths = json.loads((smollm_prune / "config.json").read_text())["layer_intermediate_sizes"]
    assert list(fields["deci.feed_forward_length"].contents()) == widths and len(set(widths)) > 1
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in types  # tied: llama.cpp's output layer reads token_embd
    assert types["token_embd.weight"] == "F32" and types["blk.0.ffn_up.weight"] == outtype.upper()

    model, tok = hf_prune
    llm = llama_cpp_model(out)
    agreed = 0
    for prompt in PROMPTS:
        ids = chat_ids(tok, prompt)
        assert llm.tokenize(tok.decode(ids).encode(), add_bos=False, special=True) == ids  # same tokenizer
        with torch.no_grad():
            ours = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        diff = (next_token_logprobs(llm, ids) - ours).abs()
        if outtype == "f32":
            assert diff.max() <= 1e-3, (prompt, diff.max())
        else:
            likely = ours >= np.log(1e-2)
            assert diff[likely].max() <= 1e-2 and diff.max() <= 5e-2, (prompt, diff[likely].max(), diff.max())
        agreed += agree_greedily(llm, model, ids, 16, tie=1e-3 if outtype == "f32" else 2e-2)
    assert agreed >= len(PROMPTS) - 1  # at most one prompt parts, and only at a near-tie


def test_gguf_perplexity_matches_transformers(smollm_prune, hf_prune, tmp_path, data_dir):
    """WikiText-2, first 40 windows of 128 tokens: f16 within 1% of transformers' perplexity, q8_0 within 2%."""
    from dadpo.export import export_gguf
    from dadpo.perplexity import load_corpus, perplexity

    model, tok = hf_prune
    text = load_corpus("wikitext2", data_dir)[:60_000]
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) >= 40 * 128
    hf = perplexity(model, tok, text, seq_len=128, max_windows=40, progress=False)
    assert hf["windows"] == 40
    for outtype, tolerance in (("f16", 0.01), ("q8_0", 0.02)):
        export_gguf(smollm_prune, tmp_path / f"p-{outtype}.gguf", outtype)
        llm = llama_cpp_model(tmp_path / f"p-{outtype}.gguf")
        nll = []
        for w in range(40):
            window = ids[w * 128:(w + 1) * 128]
            llm.reset()
            llm.eval(window)
            logp = torch.log_softmax(torch.tensor(llm.scores[:127], dtype=torch.float64), -1)
            nll.append(-logp[torch.arange(127), torch.tensor(window[1:])].mean().item())
        ppl = float(np.exp(np.mean(nll)))
        assert abs(ppl / hf["ppl"] - 1) <= tolerance, (outtype, ppl, hf["ppl"])


def test_q8_0_keeps_rows_that_are_not_multiples_of_32_in_f16(smollm_prune, tmp_path):
    import gguf

    from dadpo.export import export_gguf

    s = export_gguf(smollm_prune, tmp_path / "q.gguf", "q8_0")
    types = {t.name: (t.tensor_type.name, int(t.shape[0])) for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    odd = {n for n, (_, row) in types.items() if n.endswith("ffn_down.weight") and row % 32}
    assert odd and {types[n][0] for n in odd} == {"F16"} and len(s["kept_f16"]) == len(odd)
    assert {t for n, (t, row) in types.items() if n.endswith(("ffn_up.weight", "attn_q.weight"))} == {"Q8_0"}
    assert {t for n, (t, _) in types.items() if n.endswith("norm.weight")} == {"F32"}
    llama_cpp_model(tmp_path / "q.gguf")  # the mixed file loads (its perplexity: the test above)


TRICKY = "It's 12345 apples, isn't it?\n\n  Numbers: 3.14159 and 2024!\tTabs   spaces\r\nÜber naïve café 東京 😀 I'LL"


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_llama_cpp_splits_text_like_the_hf_tokenizer_for_each_pre_tokenizer(tmp_path, pre):
    """The pre-tokenizer name written for a tokenizer.json makes llama.cpp tokenize as transformers does."""
    from tokenizers import Tokenizer

    from dadpo.export import _LLAMA3_SPLIT, _QWEN2_SPLIT, export_gguf, pre_tokenizer_name

    tok = load_tokenizer("smollm2-135m-instruct")
    folder = save_tiny(tmp_path, tok, "llama")
    tj = json.loads((folder / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    split = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}
    if pre == "smollm":
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in split:
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split[pre]}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    assert pre_tokenizer_name(tj["pre_tokenizer"]) == pre
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    llm = llama_cpp_model(tmp_path / "m.gguf", vocab_only=True)
    hf = Tokenizer.from_str(json.dumps(tj)).encode(TRICKY, add_special_tokens=False).ids
    assert llm.tokenize(TRICKY.encode(), add_bos=False, special=False) == hf


def test_unknown_pre_tokenizers_are_refused():
    from dadpo.export import pre_tokenizer_name

    assert pre_tokenizer_name({"type": "Whitespace"}) is None
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}) is None
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}}, {"type": "ByteLevel", "use_regex": False}]}) is None


def test_export_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, smollm_dir):
    from transformers import GPT2Config

    code, _, err = run_cli(capsys, "export", str(tmp_path / "missing"), "--gguf", str(tmp_path / "a.gguf"))
    assert code == 2 and "is not a model folder" in err and len(err.strip().splitlines()) == 1
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1).save_pretrained(gpt2)
    code, _, err = run_cli(capsys, "export", str(gpt2), "--gguf", str(tmp_path / "a.gguf"))
    assert code == 2 and "model_type 'gpt2'" in err
    code, _, err = run_cli(capsys, "export", str(smollm_dir), "--gguf", str(tmp_path), "--outtype", "f16")
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli(capsys, "export", str(smollm_dir), "--gguf", "x.gguf", "--outtype", "q4_k")
    assert code == 2 and "--outtype" in err
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"my own file")
    for extra in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, "export", str(smollm_dir), "--gguf", str(mine), *extra)
        assert code == 2 and str(mine) in err and mine.read_bytes() == b"my own file"
    code, _, err = run_cli(capsys, "export", str(smollm_dir), "--gguf", str(mine / "m.gguf"))
    assert code == 2 and "exists and is not a directory" in err  # a file where a folder should be
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "mine.gguf"]


def test_overwrite_replaces_only_an_export_of_dadpo(tmp_path, capsys):
    tok = load_tokenizer("smollm2-135m-instruct")
    folder = save_tiny(tmp_path, tok, "llama")
    out = tmp_path / "m.gguf"
    assert run_cli(capsys, "export", str(folder), "--gguf", str(out))[0] == 0
    first = out.stat().st_mtime_ns
    code, _, err = run_cli(capsys, "export", str(folder), "--gguf", str(out))
    assert code == 2 and "--overwrite" in err and out.stat().st_mtime_ns == first
    assert run_cli(capsys, "export", str(folder), "--gguf", str(out), "--outtype", "f32", "--overwrite")[0] == 0
    assert out.stat().st_mtime_ns != first
