"""Bad input that used to end in a Python traceback (issue 12, point 6): each now gives one line naming what is
at fault, exit code 2, and leaves nothing behind. Run through the real `dadpo` entry point with real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import run_cli
from dadpo.data import load_prompts
from dadpo.errors import DadpoError
from dadpo.io import append_jsonl, read_jsonl
from dadpo.models import embedded_gguf
from dadpo.recipe import validate_recipe

ALIAS = "smollm2-135m-instruct"


def one_line_error(capsys, *args: str) -> str:
    """Run `dadpo ARGS` and return its error line, asserting exit 2 and one line `dadpo CMD: error: ...`."""
    code, _, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dadpo {args[0]}: error: "), err
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a folder): what a command may not change."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@contextmanager
def read_only_dir(path: Path):
    """A real folder nobody can write into, root included: mode 555, and immutable when we are root
    (root ignores mode bits). Skips the test where neither works."""
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only folder here")
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty $DADPO_CACHE: GGUF checks must fail before anything (a digest, a conversion) lands in it."""
    path = tmp_path / "cache"
    monkeypatch.setenv("DADPO_CACHE", str(path))
    return path


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Say hi."}\n')
    return path


# -- GGUF files and model folders ---------------------------------------------------------------------------

def _gguf_prefix(n_bytes: int) -> bytes:
    with open(embedded_gguf(ALIAS), "rb") as f:
        return f.read(n_bytes)


@pytest.mark.parametrize(("content", "cmd", "needle"), [
    (b"\x00garbage" * 300, "generate", "is not a GGUF file"),
    (b"", "prune", "is not a GGUF file"),
    (_gguf_prefix(100_000), "prune", "its GGUF header is damaged or cut short"),  # cut inside the metadata
    (_gguf_prefix(2_000_000), "evaluate", "is truncated: 2000000 bytes"),  # whole header, little data
])
def test_garbage_or_truncated_gguf(capsys, tmp_path, cache, prompts, content, cmd, needle):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(content)
    out = tmp_path / "out"
    args = {"generate": ["--model", str(gguf), "--prompts", str(prompts), "--out", str(out)],
            "prune": ["--model", str(gguf), "--out", str(out)],
            "evaluate": ["--students", str(gguf), "--teacher", str(gguf), "--sets", f"p={prompts}", "--out",
                         str(out)]}[cmd]
    line = one_line_error(capsys, cmd, *args)
    assert f"model file {gguf}" in line and needle in line
    assert not out.exists() and not cache.exists()  # not even the file's digest was remembered


def _edited_gguf(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A copy of the bundled GGUF with metadata bytes `old` replaced by `new` (same length)."""
    data = bytearray(embedded_gguf(ALIAS).read_bytes())
    at = data.index(old)
    data[at:at + len(old)] = new
    path = tmp_path / "edited.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("old", "new", "needle"), [
    (b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llama",
     b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llamb",
     "architecture llamb is not supported"),
    (b"tokenizer.ggml.tokens", b"tokenizer.ggml.tokenX", "its metadata lacks 'tokens'"),
])
def test_gguf_transformers_cannot_convert(capsys, tmp_path, cache, old, new, needle):
    gguf = _edited_gguf(tmp_path, old, new)
    line = one_line_error(capsys, "generate", "--model", str(gguf), "--prompt", "hi")
    assert f"model file {gguf} cannot be converted" in line and needle in line
    assert not list((cache / "gguf").iterdir())  # the half-made conversion is gone


@pytest.mark.slow
def test_gguf_missing_weights_is_refused_not_randomly_initialised(capsys, tmp_path, cache):
    gguf = _edited_gguf(tmp_path, b"llama.block_count", b"llama.blockXcount")  # 32 layers assumed, 30 given
    code, _, err = run_cli(capsys, "generate", "--model", str(gguf), "--prompt", "hi")
    # the conversion ran (its progress bars are on stderr too), then refused what it made
    assert code == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("dadpo generate: error: ")
    assert "lacks 18 weights its architecture needs" in err.splitlines()[-1]
    assert not list((cache / "gguf").iterdir())


@pytest.fixture
def unknown_type_dir(tmp_path, smollm_dir) -> Path:
    """The real SmolLM2 folder (tokenizer and all) with model_type `foo`, which transformers does not know."""
    path = tmp_path / "foo-model"
    shutil.copytree(smollm_dir, path, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "foo"}))
    return path


@pytest.mark.parametrize("cmd", ["generate", "evaluate", "recover"])
def test_unknown_model_type(capsys, tmp_path, unknown_type_dir, prompts, cmd):
    spec, out = str(unknown_type_dir), tmp_path / "out"
    args = {"generate": ["--model", spec, "--prompts", str(prompts), "--out", str(out)],
            "evaluate": ["--students", spec, "--teacher", ALIAS, "--sets", f"p={prompts}", "--out", str(out)],
            "recover": ["--student", spec, "--teacher", ALIAS, "--prompts", str(prompts), "--out", str(out)]}[cmd]
    line = one_line_error(capsys, cmd, *args)
    assert f"model {spec}: config.json is not usable" in line and "model type `foo`" in line
    assert not out.exists()


@pytest.mark.parametrize(("config", "needle"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "cannot read config.json"),
    (b'{"model_type": "llama"}', "cannot load tokenizer"),  # a config without any tokenizer files beside it
])
def test_broken_model_folder(capsys, tmp_path, config, needle):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes(config)
    line = one_line_error(capsys, "generate", "--model", str(folder), "--prompt", "hi")
    assert needle in line


# -- --out that cannot be written -------------------------------------------------------------------------

def _out_args(cmd: str, out: Path, prompts: Path) -> list[str]:
    return {"generate": ["--prompts", str(prompts), "--out", str(out)],
            "prune": ["--model", ALIAS, "--out", str(out)],
            "recover": ["--student", ALIAS, "--teacher", ALIAS, "--prompts", str(prompts), "--out", str(out)],
            "evaluate": ["--students", ALIAS, "--teacher", ALIAS, "--out", str(out)]}[cmd]


@pytest.mark.parametrize("cmd", ["generate", "prune", "recover", "evaluate"])
@pytest.mark.parametrize("where", ["read-only", "read-only/new", "under-a-file"])
def test_out_that_cannot_be_written(capsys, tmp_path, prompts, cmd, where):
    (tmp_path / "file").write_text("mine\n")
    with read_only_dir(tmp_path / "locked") as ro:
        out = {"read-only": ro if cmd != "generate" else ro / "a.jsonl", "read-only/new": ro / "new" / "a",
               "under-a-file": tmp_path / "file" / "a"}[where]
        before = tree(tmp_path)
        line = one_line_error(capsys, cmd, *_out_args(cmd, out, prompts))
        assert line.startswith(f"dadpo {cmd}: error: --out {out}")
        why = "(read-only or permission denied)" if where != "under-a-file" else "file exists and is not a directory"
        assert line.endswith(why)
        assert tree(tmp_path) == before


def test_evaluate_out_that_is_a_file(capsys, tmp_path):
    out = tmp_path / "results"
    out.write_text("mine\n")
    line = one_line_error(capsys, "evaluate", "--students", ALIAS, "--teacher", ALIAS, "--out", str(out))
    assert line.endswith(f"--out {out} exists and is not a directory") and out.read_text() == "mine\n"


def test_evaluate_leaves_no_empty_out_on_an_early_error(capsys, tmp_path, prompts):
    out = tmp_path / "eval"
    line = one_line_error(capsys, "evaluate", "--students", str(tmp_path / "no-such-model"), "--teacher", ALIAS,
                          "--sets", f"p={prompts}", "--out", str(out))
    assert "no-such-model" in line and not out.exists()


# -- config, recipe and prompt files ------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "needle"), [
    (b"\xff\xfe\x00s\x00e\x00t\x00s", "not UTF-8 text (byte 0xff at offset 0)"),
    (b"sets: [vicuna_bench\n", "invalid YAML at line 2, column 1"),  # yaml's own message spans 6 lines
    (b"sets: [\x00]\n", "invalid YAML: unacceptable character #x0000"),
])
def test_evaluate_config_that_is_not_yaml_text(capsys, tmp_path, content, needle):
    config = tmp_path / "eval.yaml"
    config.write_bytes(content)
    line = one_line_error(capsys, "evaluate", "--students", ALIAS, "--teacher", ALIAS, "--out",
                          str(tmp_path / "out"), "--config", str(config))
    assert f"--config {config}" in line and needle in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("content", "needle"), [
    ('{"prompt": "a"}\n{"prompt": "b', "not valid JSON at line 2, column 12"),  # a torn line 2 is line 2
    ('\n\n{"prompt": "a"}\n{"prompt": 5}\n', "row 1 is not valid prompt (ValueError: turn content must be text"),
    ('{"instruction": null, "output": "x"}\n', "row 0 is not valid alpaca"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}, '
     '{"role": "user", "content": "and?"}]}\n', "turn role 'robot' is not one of"),
    ('{"prompt": "a", "reference": {"text": "b"}}\n', "reference must be text, got dict"),
])
def test_prompt_rows_that_cannot_be_answered(capsys, tmp_path, content, needle):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    before = tree(tmp_path)
    line = one_line_error(capsys, "generate", "--prompts", str(path), "--out", str(tmp_path / "a.jsonl"))
    assert f"dataset {path}" in line and needle in line
    assert tree(tmp_path) == before  # no a.jsonl.part


@pytest.mark.parametrize("content", ["5", '"text"', "null"])
def test_json_prompt_file_holding_no_list(capsys, tmp_path, content):
    path = tmp_path / "p.json"
    path.write_text(content)
    line = one_line_error(capsys, "generate", "--prompts", str(path), "--out", str(tmp_path / "a.jsonl"))
    assert line.endswith(f"dataset {path} must hold a list of JSON objects")


def test_jsonl_rows_may_hold_unicode_line_separators(tmp_path):
    """We write JSONL with ensure_ascii=False, so U+2028/U+0085 inside a string are written raw; they do
    not end the line."""
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "one\u2028two\x85three", "id": "a"}, {"prompt": "b", "id": "b"}]
    append_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert [r.user_turns for r in load_prompts(str(path))] == [["one\u2028two\x85three"], ["b"]]


def test_read_jsonl_counts_lines_in_the_file(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(json.JSONDecodeError) as e:
        read_jsonl(path)
    assert (e.value.lineno, e.value.colno) == (3, 8)


# -- recover's LoRA modules and messages that repeat themselves ---------------------------------------------

def test_empty_lora_target_modules_is_refused_before_any_work(capsys, tmp_path, prompts):
    out = tmp_path / "r"
    line = one_line_error(capsys, "recover", "--student", ALIAS, "--teacher", ALIAS, "--prompts", str(prompts),
                          "--out", str(out), "--lora", "--lora-target-modules", "")
    assert line == "dadpo recover: error: --lora-target-modules: give at least one module name, and no empty " \
                   "names, got []"
    assert not out.exists()


def test_recipe_lora_without_modules_is_refused():
    with pytest.raises(DadpoError, match=r"^r: recover\.lora\.target_modules: give at least one module name"):
        validate_recipe({"name": "t", "output_dir": "o", "student": "s", "recover": {"lora": {"target_modules": []}}},
                        "r")


@pytest.mark.parametrize(("args", "expected"), [
    (["prune", "--model", ALIAS, "--out", "o", "--ratio", "-0.2"],
     "dadpo prune: error: --ratio: must be in (0, 0.9], got -0.2"),
    (["recover", "--student", "s", "--teacher", "t", "--prompts", "p", "--out", "o", "--beta2", "-0.2"],
     "dadpo recover: error: --beta2: must be > 0, got -0.2"),
    (["evaluate", "--students", "s", "--teacher", "t", "--out", "o", "--sets", "nope"],
     "dadpo evaluate: error: sets: unknown nope (evaluation sets are dolly, vicuna_bench, mt_bench, "
     "self_instruct, alpaca_eval, or NAME=PATH for a prompt file of your own)"),
    (["evaluate", "--students", "s", "--teacher", "t", "--out", "o", "--seq-lens", "1"],
     "dadpo evaluate: error: seq_lens: every window length must be ≥ 2, got [1]"),
    (["evaluate", "--students", "s", "--teacher", "t", "--out", "o", "--judge", "openai:m", "--judge-base-url",
      "ftp://x"], "dadpo evaluate: error: judge.base_url: must start with http:// or https://, got 'ftp://x'"),
])
def test_cli_messages_say_things_once(capsys, args, expected):
    assert one_line_error(capsys, *args) == expected


@pytest.mark.parametrize(("edit", "expected"), [
    ({"recover": {"beta1": -0.2}}, "r: recover.beta1: must be > 0, got -0.2"),
    ({"prune": {"ratio": -0.2}}, "r: prune.ratio: must be in (0, 0.9], got -0.2"),
    ({"evaluate": {"sets": ["nope"]}}, "r: evaluate.sets: unknown nope (evaluation sets are dolly, vicuna_bench, "
                                       "mt_bench, self_instruct, alpaca_eval, or NAME=PATH for a prompt file of "
                                       "your own)"),
    ({"recover": {"beta1": "big"}}, "r: recover.beta1: Input should be a valid number, unable to parse string as a "
                                    "number (got 'big')"),
])
def test_recipe_messages_say_things_once(edit, expected):
    data = {"name": "t", "output_dir": "o", "student": "s", "recover": {}, **edit}
    if "prune" in edit:
        data["student"] = "prune"
    with pytest.raises(DadpoError) as e:
        validate_recipe(data, "r")
    assert str(e.value) == expected


# -- evaluate with no valid verdict -------------------------------------------------------------------------

class _NoVerdictJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint whose every reply names no verdict."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"content": "Both answers are fine."},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def tiny_models(tmp_path, smollm_dir) -> list[str]:
    """Two tiny random Llama chat models with SmolLM2's tokenizer: evaluate's mechanics in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(smollm_dir))
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        path = tmp_path / f"tiny{seed}"
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return paths


def test_evaluate_without_valid_verdicts_prints_n_a_not_nan(capsys, data_aliases, tmp_path, tiny_models):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoVerdictJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, out, err = run_cli(capsys, "evaluate", "--students", f"s={tiny_models[1]}", "--teacher", tiny_models[0],
                               "--sets", "vicuna_bench", "--limit", "1", "--max-new-tokens", "2", "--bootstrap", "10",
                               "--judge", "openai:m", "--judge-base-url", f"http://127.0.0.1:{server.server_port}/v1",
                               "--judge-api-key-env", "none", "--judge-retries", "0", "--out", str(tmp_path / "e"))
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert out.splitlines()[0] == ("s vs teacher on vicuna_bench: preference n/a (win n/a / tie n/a / loss n/a, "
                                   "flips 0.0%, invalid 1)")


# -- the same through the installed entry point, as a user runs it ------------------------------------------

@pytest.mark.parametrize("case", ["garbage-gguf", "read-only-out", "binary-config"])
def test_real_command_prints_one_line(tmp_path, case):
    (tmp_path / "m.gguf").write_bytes(b"not a gguf at all")
    (tmp_path / "c.yaml").write_bytes(bytes(range(256)))
    with read_only_dir(tmp_path / "ro") as ro:
        args = {"garbage-gguf": ["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "hi"],
                "read-only-out": ["prune", "--model", ALIAS, "--out", str(ro / "p")],
                "binary-config": ["evaluate", "--students", ALIAS, "--teacher", ALIAS, "--out", str(ro / "e"),
                                  "--config", str(tmp_path / "c.yaml")]}[case]
        before = tree(tmp_path)
        r = subprocess.run([sys.executable, "-m", "dadpo", *args], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "DADPO_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"dadpo {args[0]}: error: ")
        assert tree(tmp_path) == before
