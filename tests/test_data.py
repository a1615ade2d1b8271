"""Every prompt-set loader on the real files in ../shared/data."""

from __future__ import annotations

import json

import pytest

from dadpo.data import chat_prompt, detect_format, load_prompts, split_records
from dadpo.errors import DadpoError


@pytest.mark.parametrize(
    ("rel", "fmt", "rows"),
    [
        ("dolly15k/databricks-dolly-15k.jsonl", "dolly", 15011),
        ("alpaca_en_demo/alpaca_en_demo.json", "alpaca", 999),
        ("lima/train.jsonl", "sharegpt", 1030),
        ("dpo_en_demo/dpo_en_demo.json", "sharegpt", 300),
        ("vicuna_bench/question.jsonl", "fastchat", 80),
        ("mt_bench/question.jsonl", "fastchat", 80),
        ("alpaca_eval/gpt4_1106_preview_outputs.json", "alpaca_eval", 805),
        ("self_instruct_user_oriented/user_oriented_instructions.jsonl", "self_instruct", 252),
    ],
)
def test_loader_row_counts_and_fields(data_dir, rel, fmt, rows):
    path = data_dir / rel
    first = json.loads(path.read_text().splitlines()[0]) if path.suffix == ".jsonl" else json.loads(
        path.read_text())[0]
    assert detect_format(first) == fmt
    records = load_prompts(str(path))
    assert len(records) == rows
    assert len({r.id for r in records}) == rows, "ids must be unique"
    for r in records:
        assert r.messages and r.messages[-1]["role"] == "user" and r.messages[-1]["content"].strip()
        assert all(m["role"] in ("system", "user", "assistant") for m in r.messages)


def test_dolly_context_folded_into_user_turn(data_dir):
    records = load_prompts(str(data_dir / "dolly15k/databricks-dolly-15k.jsonl"))
    rows = [json.loads(line) for line in (data_dir / "dolly15k/databricks-dolly-15k.jsonl").open()]
    k = next(i for i, row in enumerate(rows) if row["context"].strip())
    assert records[k].messages == [{"role": "user", "content": f"{rows[k]['instruction'].strip()}\n\n"
                                    f"{rows[k]['context'].strip()}"}]
    assert records[k].reference == rows[k]["response"] and records[k].category == rows[k]["category"]
    assert {r.category for r in records} >= {"open_qa", "closed_qa", "summarization", "brainstorming"}


def test_mt_bench_keeps_both_turns_and_references(data_dir):
    records = load_prompts(str(data_dir / "mt_bench"))  # a directory resolves to its question.jsonl
    assert all(len(r.user_turns) == 2 for r in records)
    assert all(m["role"] == "user" for r in records for m in r.messages)
    with_ref = [r for r in records if r.extra.get("references")]  # per-turn references
    assert len(with_ref) == sum(1 for line in (data_dir / "mt_bench/question.jsonl").open()
                                if '"reference"' in line)
    assert {r.category for r in records} == {"writing", "roleplay", "reasoning", "math", "coding",
                                             "extraction", "stem", "humanities"}
    q133 = next(r for r in records if r.id == "133")  # its turn-1 reference is empty, turn 2's is not
    assert q133.reference is None and q133.extra["references"][1]


def test_lima_multi_turn_prompt_ends_at_last_user_turn(data_dir):
    records = load_prompts(str(data_dir / "lima/train.jsonl"))
    multi = [r for r in records if len(r.messages) > 1]
    assert len(multi) == 30, "LIMA has 30 multi-turn conversations"
    for r in multi:
        roles = [m["role"] for m in r.messages]
        assert roles[-1] == "user" and roles[::2] == ["user"] * len(roles[::2])
    single = [r for r in records if len(r.messages) == 1]
    assert all(r.reference for r in single)


def test_sharegpt_preference_pairs_kept(data_dir):
    records = load_prompts(str(data_dir / "dpo_en_demo/dpo_en_demo.json"))
    assert all(r.extra["chosen"] and r.extra["rejected"] for r in records)
    assert max(len(r.messages) for r in records) > 1


def test_self_instruct_input_folded(data_dir):
    records = load_prompts(str(data_dir / "self_instruct_user_oriented/user_oriented_instructions.jsonl"))
    r = records[0]
    assert r.id == "user_oriented_task_0" and r.category == "Grammarly"
    assert "\n\n" in r.messages[0]["content"] and r.reference


def test_aliases_resolve_under_data_dir(data_aliases):
    assert len(load_prompts("vicuna_bench")) == 80
    assert len(load_prompts("dolly")) == 15011


def test_alias_without_data_dir_or_hub_fails_clearly(monkeypatch):
    monkeypatch.delenv("DADPO_DATA_DIR", raising=False)
    with pytest.raises(DadpoError, match="vicuna_bench.*DADPO_DATA_DIR"):
        load_prompts("vicuna_bench")


def test_plain_prompt_jsonl_and_bad_inputs(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi", "id": "a"}\n{"prompt": "there"}\n')
    assert [r.id for r in load_prompts(str(good))] == ["a", "1"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DadpoError, match="empty"):
        load_prompts(str(empty))
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "x"}\n')
    with pytest.raises(DadpoError, match="unknown dataset format"):
        load_prompts(str(odd))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DadpoError, match="not valid JSON"):
        load_prompts(str(broken))
    with pytest.raises(DadpoError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DadpoError, match="row 0"):
        load_prompts(str(good), fmt="dolly")


def test_split_is_seeded_deterministic_and_disjoint(data_dir):
    records = load_prompts(str(data_dir / "vicuna_bench/question.jsonl"))
    train, held = split_records(records, 20, seed=3)
    assert len(held) == 20 and len(train) == 60
    assert not {r.id for r in train} & {r.id for r in held}
    assert [r.id for r in split_records(records, 20, seed=3)[1]] == [r.id for r in held]
    assert [r.id for r in split_records(records, 20, seed=4)[1]] != [r.id for r in held]
    assert len(split_records(records, 0.25, seed=0)[1]) == 20
    with pytest.raises(DadpoError):
        split_records(records, 81)


def test_chat_prompt_uses_tokenizer_template(smollm):
    _, tok = smollm
    text = chat_prompt(tok, [{"role": "user", "content": "Hello there"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHello there<|im_end|>" in text
