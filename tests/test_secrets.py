"""The judge's API key: a shared recipe cannot send an arbitrary environment variable to an endpoint of its
author's choosing; the user may name any variable on the command line; the host that receives the key is
announced before the first request; the key itself never lands in output files or logs."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import yaml

from dadpo.cli import main
from dadpo.errors import DadpoError
from dadpo.evaluate.config import TYPED_KEY_ENV, EvalConfig
from dadpo.recipe import validate_recipe

RECIPE = {
    "name": "t", "output_dir": "OUT", "teacher": "smollm2-135m-instruct", "student": "prune",
    "prune": {"ratio": 0.2}, "recover": {"method": "dadpo", "beta1": 0.1, "beta2": 0.1},
    "evaluate": {"sets": ["vicuna_bench"], "judge": {"kind": "openai", "model": "m", "base_url": "https://evil.example/v1"}},
}


def _recipe(api_key_env):
    data = copy.deepcopy(RECIPE)
    data["evaluate"]["judge"]["api_key_env"] = api_key_env
    return data


@pytest.mark.parametrize("name", ["HOME", "AWS_SECRET_ACCESS_KEY", "PATH", "API_KEY", "MY_API_KEY_OLD", "X_TOKENS"])
def test_a_recipe_cannot_name_an_arbitrary_variable_as_the_key(name):
    with pytest.raises(DadpoError) as e:
        validate_recipe(_recipe(name), "r.yaml")
    msg = str(e.value)
    assert msg.startswith("r.yaml: evaluate.judge.api_key_env: ") and "*_API_KEY" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["MY_API_KEY", "OPENAI_API_KEY", "HF_TOKEN", None])
def test_key_like_variables_or_none_are_accepted(name):
    assert validate_recipe(_recipe(name), "r.yaml").evaluate.judge.api_key_env == name


def test_dadpo_run_refuses_the_recipe_before_doing_anything(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    data = _recipe("AWS_SECRET_ACCESS_KEY")
    data["output_dir"] = str(tmp_path / "out")
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evaluate.judge.api_key_env" in err[0] and "AWS_SECRET_ACCESS_KEY" in err[0]
    assert not (tmp_path / "out").exists()


def test_only_the_name_typed_on_the_command_line_passes():
    data = {"judge": {"kind": "openai", "model": "m", "api_key_env": "HOME"}}
    assert EvalConfig.model_validate(data, context={TYPED_KEY_ENV: "HOME"}).judge.api_key_env == "HOME"
    with pytest.raises(ValueError, match="--judge-api-key-env"):
        EvalConfig.model_validate(data, context={TYPED_KEY_ENV: "OTHER"})
    with pytest.raises(ValueError, match="--judge-api-key-env"):
        EvalConfig.model_validate(data)


def test_evaluate_config_file_cannot_name_home(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("judge:\n  kind: openai\n  model: m\n  api_key_env: HOME\n")
    assert main(["evaluate", "--students", "s", "--teacher", "t", "--out", str(tmp_path / "o"),
                 "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge.api_key_env" in err[0], err


@pytest.fixture
def server(smollm):
    """A real OpenAI-compatible endpoint (SmolLM2) on 127.0.0.1 that records the Authorization headers."""
    from dadpo.evaluate.serve import make_server

    model, tok = smollm
    srv = make_server(model, tok, "smollm", max_tokens_cap=4)
    seen = []
    answer = srv.RequestHandlerClass.do_POST

    def recording(self):
        seen.append(self.headers.get("Authorization"))
        answer(self)

    srv.RequestHandlerClass.do_POST = recording
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/v1", seen
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def tiny_dir(smollm_dir, tmp_path):
    """A tiny random-init Llama chat model on disk with SmolLM2's tokenizer (answers in milliseconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(smollm_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_a_variable_typed_on_the_command_line_is_sent_announced_and_kept_out_of_files(
        server, tiny_dir, data_aliases, tmp_path, capsys, caplog, monkeypatch):
    url, seen = server
    secret = "sk-do-not-write-me-0123456789"
    monkeypatch.setenv("DADPO_TEST_SECRET", secret)  # not *_API_KEY: allowed because it is typed here
    out = tmp_path / "eval"
    with caplog.at_level(logging.DEBUG):
        code = main(["evaluate", "--students", f"s={tiny_dir}", "--teacher", str(tiny_dir), "--out", str(out),
                     "--sets", "vicuna_bench", "--limit", "1", "--max-new-tokens", "2", "--judge", "openai:smollm",
                     "--judge-base-url", url, "--judge-api-key-env", "DADPO_TEST_SECRET", "--judge-retries", "0"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert seen and set(seen) == {f"Bearer {secret}"}  # the endpoint got the key
    host = url.split("/")[2]
    notices = [r.getMessage() for r in caplog.records if "sending" in r.getMessage()]
    assert notices == [f"judge: sending $DADPO_TEST_SECRET to {host} over http"]
    assert secret not in stdout + stderr + caplog.text
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "results.json" for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
