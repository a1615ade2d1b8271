"""Caches follow content: the GGUF conversion cache and the evaluate caches are keyed by what the model
files hold, not by their name, so a changed file is never served its predecessor's weights or answers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from dadpo import models
from dadpo.evaluate import EvalConfig, run_evaluate

ALIAS = "smollm2-135m-instruct"


def _flip_a_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 1]))


def _differing_tensor(dir_a: Path, dir_b: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(dir_a / "model.safetensors", "pt") as a, safe_open(dir_b / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        return next((k for k in sorted(a.keys()) if not torch.equal(a.get_tensor(k), b.get_tensor(k))), None)


def test_one_byte_changed_in_the_middle_of_a_gguf_is_converted_anew(smollm_dir, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("DADPO_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "copy.gguf"
    shutil.copyfile(models.embedded_gguf(ALIAS), gguf)
    # the copy holds the bundled file's bytes: its conversion is the one already made for the alias
    original = models._gguf_cache_dir(gguf)
    original.parent.mkdir(parents=True)
    original.symlink_to(smollm_dir, target_is_directory=True)
    assert models.resolve_model(str(gguf)) == str(original)

    _flip_a_bit(gguf, gguf.stat().st_size // 2)  # tensor data: the metadata is the first 1.8 MB of 98 MB
    changed = Path(models.resolve_model(str(gguf)))
    assert changed != original and changed.parent == original.parent
    assert _differing_tensor(smollm_dir, changed) is not None  # the new cache holds the changed weights

    def no_reconversion(*a, **k):
        raise AssertionError("GGUF dequantized again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reconversion)
    assert models.resolve_model(str(gguf)) == str(changed)  # the unchanged file reuses its conversion


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("DADPO_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 100)
    assert models.file_digest(f) == hashlib.sha256(b"x" * 100).hexdigest()
    index_path = tmp_path / "cache" / "file-digests.json"
    index = json.loads(index_path.read_text())
    index[str(f.resolve())]["sha256"] = "remembered"
    index_path.write_text(json.dumps(index))
    assert models.file_digest(f) == "remembered"  # same size, times and inode: not read again
    with open(f, "r+b") as fh:  # same size, same inode, mtime set back: ctime still tells
        fh.write(b"y")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, index[str(f.resolve())]["version"][1]))
    assert models.file_digest(f) == hashlib.sha256(b"y" + b"x" * 99).hexdigest()
    index_path.write_text("{torn")  # a damaged index is only a lost cache
    assert models.file_digest(f) == hashlib.sha256(b"y" + b"x" * 99).hexdigest()


def _tiny_model_dir(path: Path, tok_dir: Path, hidden: int, seed: int) -> Path:
    """A tiny random-init Llama chat model saved with SmolLM2's tokenizer (fast to load and to run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_fingerprint_of_each_kind_of_spec(smollm_dir, tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "m", smollm_dir, 32, 0)
    before = models.model_fingerprint(str(model_dir))
    assert before.startswith("stat:") and models.model_fingerprint(str(model_dir)) == before
    (model_dir / "notes.md").write_text("not read by from_pretrained")
    (model_dir / ".marker").write_text("")
    assert models.model_fingerprint(str(model_dir)) == before
    _tiny_model_dir(model_dir, smollm_dir, 32, 1)  # pruned again in place: same files, new weights
    assert models.model_fingerprint(str(model_dir)) != before
    assert models.model_fingerprint(ALIAS) == "sha256:" + models.file_digest(models.embedded_gguf(ALIAS))[:16]
    assert models.model_fingerprint("org/name") == "org/name"  # a hub id is its own fingerprint
    assert models.model_stamp("org/name") == "org/name"
    assert models.model_stamp(str(model_dir)) == f"{model_dir}@{models.model_fingerprint(str(model_dir))}"


def test_student_rewritten_in_place_is_answered_and_measured_again(data_aliases, smollm_dir, tmp_path):
    teacher = _tiny_model_dir(tmp_path / "teacher", smollm_dir, 64, 0)
    student = _tiny_model_dir(tmp_path / "student", smollm_dir, 32, 1)
    cfg = EvalConfig.model_validate({"sets": ["vicuna_bench"], "limit": 1, "judge": None,
                                     "generation": {"max_new_tokens": 2}})
    out = tmp_path / "eval"
    first = run_evaluate({"s": str(student)}, str(teacher), out, cfg, progress=False)
    teacher_answers = next((out / "answers").glob("teacher-*/vicuna_bench.seed10.jsonl"))
    stamp = teacher_answers.stat().st_mtime_ns

    _tiny_model_dir(student, smollm_dir, 16, 2)  # the student folder is pruned again, smaller
    again = run_evaluate({"s": str(student)}, str(teacher), out, cfg, progress=False)
    assert again["students"]["s"]["params"] < first["students"]["s"]["params"]  # metrics were not reused
    rows = [json.loads(line) for line in next((out / "answers").glob("s-*/vicuna_bench.seed10.jsonl")).open()]
    assert [r["model"] for r in rows] == [models.model_stamp(str(student))]  # answered by the new weights
    assert teacher_answers.stat().st_mtime_ns == stamp  # the unchanged teacher's answers were reused


def test_local_judge_rewritten_in_place_judges_again(smollm_dir, tmp_path):
    from dadpo.evaluate.config import JudgeConfig
    from dadpo.evaluate.judge import PairItem, VerdictCache
    from dadpo.evaluate.run import make_judge

    user = {"role": "user", "content": "What is 2 + 2?"}
    four, five = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    items = [PairItem("k", [user, four], [user, five])]
    judge_dir = _tiny_model_dir(tmp_path / "judge", smollm_dir, 32, 0)
    cfg = JudgeConfig(kind="local", model=str(judge_dir))
    cache = VerdictCache(tmp_path / "verdicts.jsonl")
    first = make_judge(cfg)
    first.judge(items, cache, progress=False)
    first.judge(items, cache, progress=False)
    assert len(cache.rows) == 1  # the same judge weights: served from the cache
    _tiny_model_dir(judge_dir, smollm_dir, 32, 1)
    second = make_judge(cfg)
    second.judge(items, cache, progress=False)
    assert len(cache.rows) == 2 and second.id == first.id == f"local:{judge_dir}"  # judged again, same name
