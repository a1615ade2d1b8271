"""prune: config validation, exact ratios, GQA validity, save/reload, CLI errors — on tiny random models of
each family built from the real transformers config classes (SmolLM2's tokenizer for calibration)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dadpo.cli import main
from dadpo.errors import DadpoError
from dadpo.prune import PruneConfig, prune, prune_to_dir

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM)}


def tiny_model(family: str, tok, heads: int = 8, kv: int = 2, layers: int = 4, seed: int = 0):
    """A random-init model with the real tokenizer's vocabulary; the layers hold ~40% of its parameters."""
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=1024, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, tie_word_embeddings=True,
                  max_position_embeddings=512)
    return model_cls(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from dadpo.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def calib_file(tmp_path):
    """A small prompt set in the data module's dolly format."""
    rows = [{"instruction": f"Explain topic number {i} briefly.", "context": "",
             "response": f"Topic {i} is about things and more things.", "category": "open_qa"} for i in range(8)]
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def fast_config(**kw) -> PruneConfig:
    base = {"ratio": 0.1, "importance": "magnitude", "ppl_max_windows": 0, "sample_max_new_tokens": 0,
            "calib_samples": 8, "calib_max_len": 32, "mlp_round_to": 1, "reconstruct": False}
    return PruneConfig(**{**base, **kw})


def assert_valid_gqa(model):
    for layer in model.model.layers:
        attn = layer.self_attn
        n_q, n_kv = attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim
        assert n_q % n_kv == 0 and attn.num_key_value_groups == n_q // n_kv
        assert attn.o_proj.in_features == attn.q_proj.out_features
        assert layer.mlp.down_proj.in_features == layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features


# ---------------------------------------------------------------- config


def test_config_validates_plain_dicts_and_names_fields():
    from pydantic import ValidationError

    cfg = PruneConfig.model_validate({"ratio": 0.3, "importance": "activation", "layers": "4:28"})
    assert cfg.layer_range(30) == range(4, 28)
    for bad, field in [({"ratio": 0}, "ratio"), ({"ratio": 0.95}, "ratio"), ({"importance": "l1"}, "importance"),
                       ({"layers": "a:b"}, "layers"), ({"layers": "8:4"}, "layers"), ({"ratoi": 0.2}, "ratoi"),
                       ({"targets": "ffn"}, "targets"), ({"calib_samples": 0}, "calib_samples")]:
        with pytest.raises(ValidationError, match=field):
            PruneConfig.model_validate(bad)
    with pytest.raises(DadpoError, match="outside the model's 30"):
        PruneConfig(layers="4:40").layer_range(30)


# ---------------------------------------------------------------- mechanics


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("targets,allocation", [("both", "uniform"), ("mlp", "global"), ("both", "global")])
def test_ratio_is_hit_and_model_stays_valid(tok, family, targets, allocation):
    model = tiny_model(family, tok)
    x = torch.randint(0, 1000, (2, 12))
    report = prune(model, tok, fast_config(targets=targets, allocation=allocation))
    assert abs(report["ratio_achieved"] - 0.1) <= 0.005
    assert report["params_after"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["ratio_achieved_non_embedding"] > report["ratio_achieved"]
    assert_valid_gqa(model)
    assert model(x).logits.shape == (2, 12, len(tok))
    out = model.generate(x[:1], max_new_tokens=4, do_sample=False)  # KV cache with pruned heads
    assert out.shape == (1, 16)


def test_heads_are_pruned_consistently_per_kv_group(tok):
    model = tiny_model("llama", tok, heads=8, kv=2)
    report = prune(model, tok, fast_config(ratio=0.004, targets="heads", allocation="uniform"))
    widths = report["layer_widths"]
    assert all(w["num_key_value_heads"] == 2 and w["num_attention_heads"] == 6 for w in widths)
    assert_valid_gqa(model)


def test_taylor_scores_follow_the_calibration_loss(tok, calib_file):
    """Taylor keeps what the loss needs: a planted dead MLP channel block is pruned first."""
    model = tiny_model("llama", tok, layers=2)
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, :512] = 0  # these channels cannot change the output
    prune(model, tok, fast_config(ratio=0.05, importance="taylor", targets="mlp", layers="1:2", calib=calib_file))
    assert mlp.gate_proj.out_features < 1024
    assert (mlp.down_proj.weight.abs().sum(0) > 0).all()  # only dead channels went


def test_unreachable_ratio_and_unsupported_architecture(tok):
    with pytest.raises(DadpoError, match="cannot be reached"):
        prune(tiny_model("llama", tok), tok, fast_config(ratio=0.5, targets="mlp"))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(DadpoError, match="'gpt2' is not supported"):
        prune(gpt2, tok, fast_config())


# ---------------------------------------------------------------- saving and reloading


def save_tiny(tmp_path, tok, family="llama", **kw):
    model = tiny_model(family, tok, **kw)
    d = tmp_path / f"tiny-{family}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def logits_of(path: str) -> list:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 17)[None]).logits[0, -3:].tolist()


RELOAD = """
import json, sys, torch
assert "dadpo" not in sys.modules
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    print(json.dumps(m(input_ids=torch.arange(1, 17)[None]).logits[0, -3:].tolist()))
assert not any(k.startswith("dadpo") for k in sys.modules)
"""


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uniform_prune_reloads_without_dadpo(tmp_path, tok, family, data_aliases):
    src = save_tiny(tmp_path, tok, family, heads=4, kv=2)
    out = tmp_path / "pruned"
    report = prune_to_dir(str(src), out, fast_config(ppl_max_windows=2, sample_max_new_tokens=4))
    assert report["uniform"] and report["model_class"].startswith(("Llama", "Qwen2"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "pruning.json",
                 "report.json", "report.md"):
        assert (out / name).is_file(), name
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["source_model"] == str(src) and abs(pruning["ratio_achieved"] - 0.1) <= 0.005
    assert set(pruning["libraries"]) >= {"torch", "transformers", "torch-pruning"}
    assert report["before"]["perplexity"]["windows"] == 2 and report["after"]["sample"] is not None
    assert report["reload_max_abs_logit_diff"] <= 1e-4
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, check=True)
    fresh = torch.tensor(json.loads(proc.stdout))
    assert (fresh - torch.tensor(logits_of(str(out)))).abs().max() <= 1e-4
    assert [d for d in tmp_path.iterdir() if d.name.startswith(".")] == []  # no temp dirs left


def test_non_uniform_prune_reloads_with_from_pretrained(tmp_path, tok):
    src = save_tiny(tmp_path, tok, "mistral")
    out = tmp_path / "pruned"
    report = prune_to_dir(str(src), out, fast_config(allocation="global", targets="both", layers="1:3"))
    assert not report["uniform"] and report["model_class"] == "DadpoPrunedMistralForCausalLM"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dadpo_pruned_mistral"
    assert cfg["layer_intermediate_sizes"][0] == cfg["layer_intermediate_sizes"][3] == 1024
    assert cfg["layer_intermediate_sizes"][1:3] != [1024, 1024]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert [lay.mlp.gate_proj.out_features for lay in model.model.layers] == cfg["layer_intermediate_sizes"]
    assert report["reload_max_abs_logit_diff"] <= 1e-4


# ---------------------------------------------------------------- CLI errors


def run_cli(argv: list[str]) -> int:
    """Exit code of `dadpo ARGV` (argparse usage errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "0"], "--ratio"), (["--ratio", "0.95"], "--ratio"),
    (["--importance", "l1"], "--importance"), (["--layers", "2:9"], "layers '2:9' is outside"),
    (["--ratio", "0.8", "--targets", "heads"], "cannot be reached"),
    (["--calib", "/nonexistent/prompts.jsonl", "--ratio", "0.1"], "dataset not found"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, tok, capsys, data_aliases, extra, message):
    src = save_tiny(tmp_path, tok)
    out = tmp_path / "out"
    capsys.readouterr()
    code = run_cli(["prune", "--model", str(src), "--out", str(out), "--ppl-max-windows", "0", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_refuses_non_empty_out_and_unsupported_model(tmp_path, tok, capsys):
    src = save_tiny(tmp_path, tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["prune", "--model", str(src), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep.txt"]

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    assert main(["prune", "--model", str(gpt2), "--out", str(tmp_path / "o2")]) == 2
    assert "'gpt2' is not supported" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_cli_prunes_and_overwrites(tmp_path, tok, capsys, calib_file, data_aliases):
    """--overwrite replaces a model dadpo pruned (its pruning.json), whatever was added to it since."""
    src = save_tiny(tmp_path, tok, heads=4, kv=2)
    out = tmp_path / "out"
    args = ["prune", "--model", str(src), "--out", str(out), "--ratio", "0.05", "--importance", "taylor",
            "--calib", calib_file, "--calib-samples", "4", "--calib-max-len", "32", "--ppl-max-windows", "2"]
    assert main([*args, "--importance", "magnitude", "--no-reconstruct", "--ppl-max-windows", "0"]) == 0
    (out / "old.txt").write_text("old")
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    code = main([*args, "--overwrite"])
    assert code == 0
    assert capsys.readouterr().out.startswith("removed ")
    assert abs(json.loads((out / "report.json").read_text())["ratio_achieved"] - 0.05) <= 0.005
    assert not (out / "old.txt").exists() and (out / "report.md").read_text().startswith("# Pruned")


def test_an_unreachable_ratio_names_the_config_field_and_on_the_command_line_the_flag(tmp_path, tok, capsys):
    """Library code names `prune.ratio` (what a recipe user wrote); `dadpo prune` says `--ratio`."""
    from dadpo.errors import ConfigError

    src = save_tiny(tmp_path, tok)
    with pytest.raises(ConfigError, match=r"^prune\.ratio: 0\.8 cannot be reached") as e:
        prune_to_dir(str(src), tmp_path / "lib", PruneConfig(ratio=0.8, targets="heads", ppl_max_windows=0))
    assert e.value.field == "prune.ratio" and not (tmp_path / "lib").exists()
    code = run_cli(["prune", "--model", str(src), "--out", str(tmp_path / "cli"), "--ratio", "0.8", "--targets",
                    "heads", "--ppl-max-windows", "0"])
    assert code == 2 and "--ratio: 0.8 cannot be reached" in capsys.readouterr().err


def test_prune_scores_the_every_tenth_window_proxy_by_default_and_says_so(tmp_path, tok, calib_file, data_aliases):
    """The default perplexity is the stride-10 proxy (a tenth of the windows across the whole text), stated in
    report.json and report.md; stride 1 scores every window and says nothing of a proxy."""
    from dadpo.prune.report import render_markdown

    src = save_tiny(tmp_path, tok)
    out = tmp_path / "out"
    assert PruneConfig().ppl_window_stride == 10
    assert main(["prune", "--model", str(src), "--out", str(out), "--ratio", "0.05", "--importance", "magnitude",
                 "--no-reconstruct", "--ppl-max-windows", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    ppl = report["before"]["perplexity"]
    assert ppl["window_stride"] == 10 and report["config"]["ppl_window_stride"] == 10
    assert "every 10-th of the text (proxy)" in (out / "report.md").read_text()
    for side in ("before", "after"):
        report[side]["perplexity"]["window_stride"] = 1
    assert "proxy" not in render_markdown(report)


# ---------------------------------------------------------------- reconstruction


def test_refit_recovers_outputs_when_dropped_inputs_are_redundant():
    """If a dropped input is a linear mix of kept ones, the refit reproduces the layer exactly."""
    from dadpo.prune.reconstruct import refit_kept_columns

    torch.manual_seed(0)
    x = torch.randn(200, 4)
    x = torch.cat([x, (2 * x[:, 0] - x[:, 3])[:, None]], 1)  # column 4 = 2·x0 − x3
    w = torch.randn(3, 5)
    gram = (x.T @ x).double()
    refit = refit_kept_columns(w, gram, [0, 1, 2, 3], damping=0.0)
    assert torch.allclose(x[:, :4] @ refit.T, x @ w.T, atol=1e-4)
    assert not torch.allclose(x[:, :4] @ w[:, :4].T, x @ w.T, atol=1e-1)  # plain dropping is not exact
    # hand-checkable case: one input, duplicated; dropping the copy doubles the kept weight
    dup = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert refit_kept_columns(torch.tensor([[3.0, 5.0]]), dup.T @ dup, [0], 0.0).item() == pytest.approx(8.0)


def test_reconstruction_brings_the_pruned_model_closer_on_calibration_data(tok, calib_file):
    from dadpo.prune.importance import calibration_batches

    cfg = fast_config(ratio=0.1, importance="magnitude", targets="both", calib=calib_file)
    batch = calibration_batches(tok, cfg)[0]
    dense = tiny_model("llama", tok)
    with torch.no_grad():
        ref = dense(input_ids=batch["input_ids"]).logits
    errs = {}
    for reconstruct in (False, True):
        model = tiny_model("llama", tok)
        report = prune(model, tok, cfg.model_copy(update={"reconstruct": reconstruct}))
        assert report["reconstructed"] is reconstruct
        with torch.no_grad():
            errs[reconstruct] = (model(input_ids=batch["input_ids"]).logits - ref).pow(2).mean().item()
    assert errs[True] < 0.9 * errs[False]
