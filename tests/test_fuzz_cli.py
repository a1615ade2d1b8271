"""Fuzzing `dadpo generate`, `prune`, `recover`, `evaluate` and `run` with generated flags and file contents.

Every case carries at least one defect that the command must catch before any model weights load (a model spec
that cannot work, or for prune a calibration set that cannot), so each must end the same way: exit code 2, one
line on stderr (`dadpo CMD: error: ...`, or argparse's one-line usage error), no traceback, and no file created
or changed anywhere, neither in the case's own folder nor in dadpo's cache or a read-only folder shared by all
cases. The CLI runs in this process (`dadpo.cli.main`), in a fresh folder per case that is also the current
directory. Log records at INFO and above count as stderr lines, as `dadpo` prints them there.
"""

from __future__ import annotations

import json
import logging
import os
import string
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dadpo.cli import main
from dadpo.models import cache_root, embedded_gguf

ALIAS = "smollm2-135m-instruct"
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# -- what a case is made of --------------------------------------------------------------------------------

#: names as a shell passes them: no NUL (argv cannot hold one), now and then a space, a newline or non-ASCII
NAME = st.text(st.sampled_from(string.ascii_letters + string.digits + "._- \néß"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith("-"))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)
PROMPT_KEYS = ["prompt", "instruction", "input", "output", "context", "response", "question_id", "turns",
               "conversations", "messages", "role", "content", "from", "value", "id", "category", "reference",
               "instances", "generator", "chosen", "rejected"]
ROW = st.dictionaries(st.sampled_from(PROMPT_KEYS), JSON | st.text(max_size=12), max_size=4)


def _jsonl(rows: list, torn: bool) -> bytes:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return (text[: len(text) // 2] if torn else text).encode()


#: the content of a prompt set: bytes, one JSON document, or JSONL rows with the fields formats look for
PROMPT_FILE = st.one_of(
    st.just(b'{"prompt": "Say hi."}\n{"prompt": "And bye."}\n'),
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(_jsonl, st.lists(ROW, max_size=4), st.booleans()),
)
#: a prompt set that cannot load whatever the rest: not UTF-8, empty, rows of no known format, torn JSON
BAD_PROMPT_FILE = st.one_of(
    st.binary(max_size=100).map(lambda b: b"\xff" + b),
    st.just(b""),
    st.lists(st.dictionaries(st.sampled_from(["x", "q", "text"]), JSON, min_size=1), min_size=1, max_size=3).map(
        lambda rows: _jsonl(rows, False)),
    st.builds(_jsonl, st.lists(ROW, min_size=1, max_size=1), st.just(True)),  # half a line
)
MODEL_KEYS = ["architectures", "hidden_size", "num_hidden_layers", "vocab_size", "torch_dtype",
              "tie_word_embeddings"]
AUTO_MAP = JSON | st.dictionaries(st.sampled_from(["AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"]),
                                  JSON | st.just("mod.Class"), max_size=2)
CONFIG_JSON = st.one_of(
    st.binary(max_size=60),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model_type": st.sampled_from(["llama", "foo", "qwen2", "", 5, None])},
                          optional={**{k: JSON for k in MODEL_KEYS}, "auto_map": AUTO_MAP}
                          ).map(lambda d: json.dumps(d).encode()),
)
#: bad flag values: zero and negatives, huge numbers, NaN and infinities, and strings that are no number at all
BAD_NUMBER = st.one_of(st.integers(-3, 0).map(str), st.integers(10**9, 10**15).map(str),
                       st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0"]),
                       st.text(st.sampled_from("0123456789.-+eExnaif, "), max_size=6))


def number(valid: st.SearchStrategy) -> st.SearchStrategy[str]:
    """A flag value: three times in four a valid one (so that the checks after the flags' are reached too),
    else a bad one."""
    valid = valid.map(str)
    return st.one_of(valid, valid, valid, BAD_NUMBER)


COUNT = number(st.integers(1, 64))
SEED = number(st.integers(0, 2**31))
FRACTION = number(st.floats(0.01, 0.9))
POSITIVE = number(st.floats(0.001, 2))


@st.composite
def bad_model(draw, world) -> tuple[str, dict[str, bytes]]:
    """A model spec no command can load, and the files (path -> bytes) it needs: garbage, empty or truncated
    GGUF files, missing paths, and folders whose config.json is garbage or lacks a tokenizer beside it."""
    kind = draw(st.sampled_from(["gguf-garbage", "gguf-cut", "missing", "folder"]))
    name = "m" + draw(NAME)
    if kind == "gguf-garbage":
        return f"{name}.gguf", {f"{name}.gguf": draw(st.sampled_from([b"", b"GGUF"])) + draw(st.binary(max_size=64))}
    if kind == "gguf-cut":  # the real file's first bytes: a cut header, or a whole header and too little data
        cut = draw(st.integers(0, len(world["gguf_head"])))
        data = bytearray(world["gguf_head"][:cut])
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return f"{name}.gguf", {f"{name}.gguf": bytes(data)}
    if kind == "missing":
        return draw(st.sampled_from([f"{name}.gguf", f"./{name}", f"{name}/sub/dir", f"/nonexistent/{name}"])), {}
    return name, {f"{name}/config.json": draw(CONFIG_JSON)}


OUT_KINDS = ("new", "nested", "file", "folder", "under-file", "read-only", "too-long")


@st.composite
def out_path(draw, world, *, folder: bool, kinds: tuple[str, ...] = OUT_KINDS) -> tuple[str, dict[str, bytes]]:
    """An --out of one of `kinds`: a new path, an existing file or non-empty folder, a path under a file, one
    inside the shared read-only folder, or a name too long for the filesystem."""
    name = "o" + draw(NAME)
    kind = draw(st.sampled_from(kinds))
    if kind == "new":
        return name + ("" if folder else ".jsonl"), {}
    if kind == "nested":
        return f"{name}/x/{name}", {}
    if kind == "file":
        return name, {name: draw(st.binary(max_size=40))}
    if kind == "folder":
        return name, {f"{name}/kept.txt": b"mine\n"}
    if kind == "under-file":
        return f"{name}/out", {name: b"a file\n"}
    if kind == "read-only":
        return str(world["read_only"] / draw(st.sampled_from(["", "new", "new/deeper"]))), {}
    return "x" * 300, {}


def flags(draw, spec: dict[str, st.SearchStrategy]) -> list[str]:
    """Some of the flags in `spec`, each `--flag=VALUE` with a drawn value (or bare for a switch)."""
    chosen = draw(st.lists(st.sampled_from(sorted(spec)), unique=True, max_size=3))
    out = []
    for flag in chosen:
        value = draw(spec[flag])
        out.append(flag if value is None else f"{flag}={value}")
    return out


# -- the check -------------------------------------------------------------------------------------------

def tree(root: Path, content: bool = True) -> dict[str, object]:
    """Every path under `root` with its content (or, for the large model cache, its size and mtime)."""
    def state(p: Path) -> object:
        if p.is_dir():
            return None
        return p.read_bytes() if content else (p.stat().st_size, p.stat().st_mtime_ns)

    return {str(p.relative_to(root)): state(p) for p in sorted(root.rglob("*"))}


def fails_cleanly(world, capfd, caplog, argv: list[str], files: dict[str, bytes]) -> None:
    """Make `files` in a fresh folder, run `dadpo ARGV` there, and check the outcome (see the module doc)."""
    case = Path(tempfile.mkdtemp(dir=world["root"]))
    for rel, data in files.items():
        (case / rel).parent.mkdir(parents=True, exist_ok=True)
        (case / rel).write_bytes(data)
    before = tree(case), tree(world["read_only"]), tree(world["cache"], content=False)
    capfd.readouterr()
    caplog.clear()
    cwd = os.getcwd()
    os.chdir(case)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(cwd)
    err = capfd.readouterr().err
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    lines = err.splitlines() + logged
    assert code == 2, (argv, files, err)
    assert len(lines) == 1 and "Traceback" not in err, (argv, files, lines)
    assert lines[0].startswith(f"dadpo {argv[0]}: error: "), (argv, lines)
    assert (tree(case), tree(world["read_only"]), tree(world["cache"], content=False)) == before, (argv, lines)


class World(dict):
    """The shared parts of every case (a dict); shown short in hypothesis' reports, not as 2 MB of GGUF."""

    def __repr__(self) -> str:
        return f"World(root={self['root']})"


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm_dir):
    """What all cases share: their parent folder, a read-only folder (immutable when we are root, who ignores
    mode bits), the bundled GGUF's first 2 MB (its whole header), and the model cache (converted already)."""
    root = tmp_path_factory.mktemp("fuzz")
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    immutable = os.access(read_only, os.W_OK) and subprocess.run(
        ["chattr", "+i", str(read_only)], capture_output=True).returncode == 0
    if os.access(read_only, os.W_OK):
        read_only.chmod(0o755)
        pytest.skip("cannot make a read-only folder here")
    with open(embedded_gguf(ALIAS), "rb") as f:
        gguf_head = f.read(2_000_000)
    yield World(root=root, read_only=read_only, gguf_head=gguf_head, cache=cache_root())
    if immutable:
        subprocess.run(["chattr", "-i", str(read_only)], check=True)
    read_only.chmod(0o755)


@pytest.fixture
def env(monkeypatch, data_dir, caplog):
    """The environment of every case: dataset aliases on the test data, no judge key, INFO logging."""
    monkeypatch.setenv("DADPO_DATA_DIR", str(data_dir))  # aliases such as vicuna_bench resolve to small files
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    caplog.set_level(logging.INFO)  # as `dadpo` logs: INFO and above reach stderr


# -- one test per command ------------------------------------------------------------------------------

@FUZZ
@given(data=st.data())
def test_generate(world, env, capfd, caplog, data):
    draw = data.draw
    model, files = draw(bad_model(world))
    argv = ["generate", "--model", model]
    if draw(st.booleans()):
        prompts, out = "p" + draw(NAME), draw(out_path(world, folder=False))
        kind = draw(st.sampled_from(["file", "alias", "missing"]))
        if kind == "file":
            prompts += draw(st.sampled_from([".jsonl", ".json", ""]))
            files[prompts] = draw(PROMPT_FILE)
        elif kind == "alias":
            prompts = draw(st.sampled_from(["vicuna_bench", "mt_bench", "self_instruct", "alpaca_demo"]))
        argv += ["--prompts", prompts, "--out", out[0]]
        files.update(out[1])
        if draw(st.booleans()):
            argv += ["--format", draw(st.sampled_from(["dolly", "alpaca", "fastchat", "sharegpt", "messages",
                                                       "prompt", "bogus"]))]
    else:
        argv += ["--prompt", draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                                          max_size=20))]
    argv += flags(draw, {"--max-new-tokens": COUNT, "--batch-size": COUNT, "--limit": COUNT, "--seed": SEED,
                         "--temperature": POSITIVE, "--top-p": FRACTION, "--overwrite": st.none()})
    fails_cleanly(world, capfd, caplog, argv, files)


@FUZZ
@given(data=st.data())
def test_prune(world, env, capfd, caplog, data):
    draw = data.draw
    out, files = draw(out_path(world, folder=True))
    argv = ["prune", "--out", out]
    argv += flags(draw, {"--ratio": FRACTION, "--importance": st.sampled_from(["taylor", "activation", "magnitude",
                                                                            "random", "best"]),
                         "--targets": st.sampled_from(["mlp", "heads", "both", "all"]),
                         "--layers": st.one_of(st.text("0123456789: -x", max_size=6), st.just("5:2"), st.just(":")),
                         "--allocation": st.sampled_from(["uniform", "global", "local"]),
                         "--calib-samples": COUNT, "--calib-max-len": number(st.integers(8, 512)),
                         "--calib-batch-size": COUNT, "--reconstruct-damping": FRACTION, "--mlp-round-to": COUNT,
                         "--ppl-seq-len": number(st.integers(2, 256)), "--ppl-max-windows": number(st.integers(0, 8)),
                         "--seed": SEED, "--no-reconstruct": st.none(),
                         "--overwrite": st.none()})
    if draw(st.booleans()):  # a model that cannot work
        model, more = draw(bad_model(world))
        files.update(more)
    else:  # the real model, and a calibration set that cannot (calibration is then always needed)
        model = ALIAS
        calib = "p" + draw(NAME) + ".jsonl"
        files[calib] = draw(BAD_PROMPT_FILE)
        argv += ["--calib", calib, "--reconstruct"]
    fails_cleanly(world, capfd, caplog, argv + ["--model", model], files)


@FUZZ
@given(data=st.data())
def test_recover(world, env, capfd, caplog, data):
    draw = data.draw
    bad, files = draw(bad_model(world))
    student, teacher = draw(st.sampled_from([(bad, ALIAS), (ALIAS, bad), (bad, bad)]))
    out, more = draw(out_path(world, folder=True))
    files.update(more)
    prompts = "p" + draw(NAME) + ".jsonl"
    files[prompts] = draw(PROMPT_FILE)
    argv = ["recover", "--student", student, "--teacher", teacher, "--prompts", prompts, "--out", out]
    argv += flags(draw, {f: POSITIVE for f in ("--beta1", "--beta2", "--lr", "--epochs", "--kd-weight",
                                               "--temperature", "--dsft-epochs", "--dsft-lr")}
                  | {f: FRACTION for f in ("--warmup-ratio", "--kd-jsd-beta", "--lora-dropout", "--top-p")}
                  | {f: COUNT for f in ("--batch-size", "--grad-accum", "--max-prompt-len", "--max-response-len",
                                        "--save-steps", "--train-prompts", "--kd-top-k", "--lora-r", "--lora-alpha",
                                        "--max-new-tokens", "--gen-batch-size")}
                  | {"--seed": SEED, "--eval-prompts": number(st.integers(0, 3))}
                  | {"--method": st.sampled_from(["dsft", "kd", "dpo", "dadpo", "ppo"]), "--lora": st.none(),
                     "--lora-target-modules": st.text(string.ascii_lowercase + "_, ", max_size=12),
                     "--overwrite": st.none(), "--bf16": st.none()})
    fails_cleanly(world, capfd, caplog, argv, files)


EVAL_KEYS = ["sets", "limit", "generation", "judge", "tasks", "task_limit", "data_dir", "ppl_corpora", "seq_lens",
             "bootstrap", "seed", "max_new_tokens", "kind", "model", "base_url", "api_key_env"]
CONFIG_FILE = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=60).map(str.encode),
    st.dictionaries(st.sampled_from(EVAL_KEYS), JSON, max_size=4).map(
        lambda d: yaml.safe_dump(d).encode()),
    st.dictionaries(st.sampled_from(EVAL_KEYS), JSON, max_size=3).map(
        lambda d: yaml.safe_dump({"name": "r", "evaluate": d}).encode()),
)


@FUZZ
@given(data=st.data())
def test_evaluate(world, env, capfd, caplog, data):
    draw = data.draw
    bad, files = draw(bad_model(world))
    names = draw(st.lists(NAME.filter(lambda s: "=" not in s and "," not in s and "\n" not in s), max_size=2))
    students = [f"{n}={ALIAS}" for n in names] + [bad if draw(st.booleans()) else f"b={bad}"]
    teacher = ALIAS
    if draw(st.booleans()):  # the teacher is the one that cannot work
        students[-1], teacher = ALIAS, bad
    out, more = draw(out_path(world, folder=True))
    files.update(more)
    argv = ["evaluate", "--students", ",".join(draw(st.permutations(students))), "--teacher", teacher, "--out", out]
    if draw(st.booleans()):
        files["eval.yaml"] = draw(CONFIG_FILE)
        argv += ["--config", "eval.yaml"]
    argv += flags(draw, {"--sets": st.sampled_from(["vicuna_bench", "mt_bench,vicuna_bench", "none", "bogus",
                                                    "dolly,,x"]),
                         "--tasks": st.sampled_from(["piqa", "all", "mmlu", ""]),
                         "--ppl": st.sampled_from(["wikitext2", "nothere.txt", "eval.yaml"]),
                         "--seq-lens": st.sampled_from(["128", "1", "x", "64,128", ""]),
                         "--judge": st.sampled_from(["none", "local:" + ALIAS, "openai:m", "gpt4", "local:"]),
                         "--judge-base-url": st.sampled_from(["http://127.0.0.1:9/v1", "ftp://x", ""]),
                         "--judge-api-key-env": st.sampled_from(["none", "HOME", "NO_SUCH_VAR_X", ""]),
                         "--data-dir": NAME}
                  | {f: COUNT for f in ("--limit", "--task-limit", "--judge-concurrency", "--judge-retries",
                                        "--max-new-tokens", "--batch-size", "--bootstrap")}
                  | {"--seed": SEED, "--judge-timeout": POSITIVE, "--temperature": POSITIVE})
    fails_cleanly(world, capfd, caplog, argv, files)


RECIPE_KEYS = ["name", "output_dir", "seed", "teacher", "student", "prompts", "data_dir", "prune", "recover",
               "evaluate", "ratio", "method", "beta1", "sets"]
RECIPE_FILE = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=80).map(str.encode),
    st.dictionaries(st.sampled_from(RECIPE_KEYS), JSON, max_size=5).map(lambda d: yaml.safe_dump(d).encode()),
    # a whole recipe reading the fuzzed p.jsonl, now and then with a value gone wrong
    st.fixed_dictionaries(
        {"name": st.just("r"), "output_dir": st.just("o"), "student": st.just("prune"), "prompts": st.just("p.jsonl"),
         "prune": st.fixed_dictionaries({"ratio": st.sampled_from([0.2, 0.2, 0.2, 0, "x"]),
                                         "calib": st.sampled_from(["p.jsonl", "vicuna_bench", "nothere.jsonl"])}),
         "recover": st.fixed_dictionaries({"method": st.sampled_from(["dsft", "dadpo", "dadpo", "sft"])},
                                          optional={"lora": st.sampled_from([{"r": 4}, {"target_modules": []}])}),
         "evaluate": st.fixed_dictionaries({"sets": st.sampled_from([["vicuna_bench"], ["vicuna_bench"], ["bogus"]])})},
        optional={"data_dir": st.sampled_from([".", "nothere"])}).map(lambda d: yaml.safe_dump(d).encode()),
)


@FUZZ
@given(data=st.data())
def test_run(world, env, capfd, caplog, data):
    draw = data.draw
    files = {"r.yaml": draw(RECIPE_FILE), "p.jsonl": draw(PROMPT_FILE)}
    # not "too-long": dadpo.pipeline.check_output_dir still lets that OSError (ENAMETOOLONG) escape
    out, more = draw(out_path(world, folder=True, kinds=OUT_KINDS[:-1]))
    files.update(more)
    # the runner converts a GGUF teacher during its stage, so its cheap check needs a missing or broken folder
    teacher = draw(st.sampled_from(["./no-such-teacher", "broken-teacher"]))
    files["broken-teacher/config.json"] = b"{"
    argv = ["run", "r.yaml", "--out", out, "--set", f"teacher={teacher}"] + (["--dry-run"] if draw(st.booleans())
                                                                           else [])
    fails_cleanly(world, capfd, caplog, argv, files)
