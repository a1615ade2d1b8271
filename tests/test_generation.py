"""Batched generation on the real SmolLM2: answers, multi-turn, resume, settings checks."""

from __future__ import annotations

import json

import pytest

from dadpo.data import PromptRecord, load_prompts
from dadpo.errors import DadpoError
from dadpo.generation import AnswerJob, GenerationConfig, answer_records, generate_to_file, generate_to_files


def _rec(i, *turns):
    return PromptRecord(str(i), [{"role": "user", "content": t} for t in turns])


@pytest.fixture
def answered(monkeypatch) -> list[list[str]]:
    """The prompt ids of every `answer_stream` call from here on: what was actually answered."""
    import dadpo.generation as gen

    calls, stream = [], gen.answer_stream

    def counting(model, tok, batch, cfg, seeds=None):
        calls.append([r.id for r in batch])
        return stream(model, tok, batch, cfg, seeds)

    monkeypatch.setattr(gen, "answer_stream", counting)
    return calls


def test_greedy_answer_knows_paris(smollm):
    model, tok = smollm
    row = answer_records(model, tok, [_rec(0, "What is the capital of France?")],
                         GenerationConfig(max_new_tokens=32))[0]
    assert "Paris" in row["response"]
    assert row["finish_reason"] == "stop" and "<|im_end|>" not in row["response"]


def test_left_padded_batch_matches_single_greedy(smollm):
    model, tok = smollm
    recs = [_rec(0, "Name three primary colors."), _rec(1, "What is 2+2? Answer with one number only, no words.")]
    cfg = GenerationConfig(max_new_tokens=24, batch_size=2)
    batched = [r["response"] for r in answer_records(model, tok, recs, cfg)]
    single = [answer_records(model, tok, [r], cfg)[0]["response"] for r in recs]
    assert batched == single


def test_sampling_is_seeded(smollm):
    model, tok = smollm
    recs = [_rec(0, "Write one sentence about the sea.")]
    a = answer_records(model, tok, recs, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1))
    b = answer_records(model, tok, recs, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=1))
    c = answer_records(model, tok, recs, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=2))
    assert a[0]["response"] == b[0]["response"] != c[0]["response"]


def test_second_turn_sees_first_answer(smollm, data_dir):
    model, tok = smollm
    rec = load_prompts(str(data_dir / "mt_bench/question.jsonl"))[0]
    row = answer_records(model, tok, [rec], GenerationConfig(max_new_tokens=12))[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert len(row["responses"]) == 2 and row["messages"][1]["content"] == row["responses"][0]
    assert row["response"] == row["responses"][1]


def test_resume_after_interruption_and_settings_guard(smollm, tmp_path, answered):
    model, tok = smollm
    recs = [_rec(i, f"Say the number {i}.") for i in range(5)]
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2)
    out = tmp_path / "answers.jsonl"
    full = generate_to_file(model, tok, recs, cfg, out, model_name="m", progress=False)
    assert [r["id"] for r in full] == [str(i) for i in range(5)] and out.exists()
    # simulate a run killed mid-append: 2 complete rows and a torn third line in OUT.part, no OUT
    lines = out.read_text().splitlines(keepends=True)
    part = tmp_path / "answers.jsonl.part"
    part.write_text("".join(lines[:2]) + lines[2][:15])
    out.unlink()
    answered.clear()
    resumed = generate_to_file(model, tok, recs, cfg, out, model_name="m", progress=False)
    done_before = {json.loads(line)["id"] for line in lines[:2]}
    assert sorted(i for c in answered for i in c) == sorted({str(i) for i in range(5)} - done_before)
    assert [r["response"] for r in resumed] == [r["response"] for r in full]
    assert not part.exists() and len(out.read_text().splitlines()) == 5
    with pytest.raises(DadpoError, match="other settings"):
        generate_to_file(model, tok, recs, GenerationConfig(max_new_tokens=9), out, model_name="m")
    again = generate_to_file(model, tok, recs[:2], GenerationConfig(max_new_tokens=9), out, model_name="m",
                             overwrite=True, progress=False)
    assert len(again) == 2 and len(out.read_text().splitlines()) == 2


def test_files_answered_from_one_queue_get_the_rows_they_get_alone_and_resume_apart(smollm, tmp_path,
                                                                                   answered):
    """Two seeds × two sets (a prompt shared by both sets) from one engine queue: every file holds exactly
    what `generate_to_file` writes for it alone. A rerun answers only what is missing: the finished file is
    left as it is, the interrupted one (two rows in its part file) gets its other prompts."""
    model, tok = smollm
    sets = {"a": [_rec(i, f"Name a fruit that starts with {c}.") for i, c in enumerate("ABCDE")],
            "b": [_rec(0, "Name a fruit that starts with A."), _rec(9, "Tell me a two-line poem.", "Again.")]}
    jobs = [AnswerJob(recs, GenerationConfig(max_new_tokens=10, temperature=1.0, batch_size=3, seed=seed),
                      tmp_path / f"{s}.seed{seed}.jsonl") for s, recs in sets.items() for seed in (1, 2)]
    alone = [generate_to_file(model, tok, j.records, j.cfg, tmp_path / "alone" / j.out.name, model_name="m",
                              progress=False) for j in jobs]
    together = generate_to_files(model, tok, jobs, model_name="m", progress=False)
    assert together == alone
    assert [j.out.read_text() for j in jobs] == [(tmp_path / "alone" / j.out.name).read_text() for j in jobs]
    assert together[0] != together[1]  # the seeds differ

    finished = jobs[0].out.stat().st_mtime_ns
    lines = jobs[1].out.read_text().splitlines(keepends=True)
    jobs[1].out.unlink()
    jobs[1].out.with_name(jobs[1].out.name + ".part").write_text("".join(lines[:2]))
    answered.clear()
    assert generate_to_files(model, tok, jobs, model_name="m", progress=False) == alone
    assert sorted(answered[0]) == ["2", "3", "4"] and jobs[0].out.stat().st_mtime_ns == finished
    with pytest.raises(ValueError, match="more than their seed"):
        generate_to_files(model, tok, [jobs[0], AnswerJob(jobs[1].records, GenerationConfig(max_new_tokens=9),
                                                          jobs[1].out)], model_name="m")


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"temperature": -1}, {"temperature": float("inf")},
                                 {"top_p": 0}, {"batch_size": 0}, {"precision": "fp8"}])
def test_bad_generation_settings(bad, capsys):
    """The config names the field; `dadpo generate` names the flag, in one line, before any model loads."""
    from pydantic import ValidationError

    from dadpo.cli import main

    field = next(iter(bad))
    with pytest.raises(ValidationError, match=field):
        GenerationConfig(**bad)
    flag = "--" + field.replace("_", "-")
    try:
        code = main(["generate", "--model", "/nonexistent/model", "--prompt", "hi", flag, str(bad[field])])
    except SystemExit as e:  # argparse refuses an unknown choice itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("overwrite", [False, True])
def test_generate_never_resumes_from_or_replaces_a_file_it_did_not_write(tmp_path, data_dir, capsys, overwrite):
    from dadpo.cli import main

    out = tmp_path / "mine.jsonl"
    out.write_text('{"id": "1", "prompt": "my own data"}\n')
    args = ["generate", "--prompts", str(data_dir / "vicuna_bench"), "--limit", "1", "--out", str(out),
            "--model", str(tmp_path / "no-such-model")]  # it must stop before any model is looked at
    assert main(args + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an answer file written by dadpo" in err[0]
    assert out.read_text() == '{"id": "1", "prompt": "my own data"}\n' and sorted(tmp_path.iterdir()) == [out]
