"""Evaluation prompt sets of one's own (`--sets NAME=PATH`, a recipe's `evaluate.sets`) next to the built-in
ones, and Dolly's held-out size as a setting (issue 14, items 2 and 3). No model is loaded here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl
from dadpo.data import load_prompts, prompt_text
from dadpo.errors import DadpoError
from dadpo.evaluate.answers import has_references, load_eval_set, load_eval_sets
from dadpo.evaluate.config import EvalConfig
from dadpo.recipe import validate_recipe


@pytest.fixture
def mine(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mine.jsonl", [
        {"id": "a", "prompt": "Name a prime number.", "reference": "Seven is a prime number."},
        {"id": "b", "prompt": "What colour is the sky?", "reference": "The sky is blue."},
        {"id": "c", "prompt": "Say hello.", "reference": "Hello!"},
    ])


def test_a_set_of_ones_own_loads_with_references_under_its_name(mine):
    cfg = EvalConfig(sets=[f"mine={mine}"], limit=2)
    sets = load_eval_sets(cfg)
    assert list(sets) == ["mine"]
    recs = sets["mine"]
    assert [r.id for r in recs] == ["a", "b"] and recs[0].reference == "Seven is a prime number."
    assert has_references(recs) and has_references([r.to_dict() for r in recs])
    assert load_eval_set(f"mine={mine.parent}/") == load_eval_set(f"mine={mine}")  # a folder holding the file


@pytest.mark.parametrize("field", ["reference", "output", "response", "answer"])
def test_a_plain_prompt_file_takes_its_reference_from_any_usual_field(tmp_path, field):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2 + 2?", field: "4"}, {"prompt": "3 + 3?"}])
    recs = load_prompts(str(path))
    assert [r.reference for r in recs] == ["4", None]
    assert has_references(recs)


def test_built_in_sets_and_their_references(data_aliases):
    sets = load_eval_sets(EvalConfig(sets=["dolly", "vicuna_bench"], judge=None))
    assert list(sets) == ["dolly", "vicuna_bench"]
    assert has_references(sets["dolly"]) and not has_references(sets["vicuna_bench"])


def test_dolly_heldout_is_a_setting(data_aliases):
    assert EvalConfig().dolly_heldout == 80
    assert len(load_eval_sets(EvalConfig(sets=["dolly"], dolly_heldout=300))["dolly"]) == 300
    assert len(load_eval_set("dolly", 5, dolly_heldout=300)) == 5
    assert [r.id for r in load_eval_set("dolly", dolly_heldout=300)[:80]] == [r.id for r in load_eval_set("dolly")]
    with pytest.raises(ValueError, match="dolly_heldout"):
        EvalConfig(dolly_heldout=0)


def test_custom_set_prompt_text_ignores_case_spacing_and_ids(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "prompt": "Name  a\nPrime number."}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "prompt": "name a prime NUMBER."}])
    assert prompt_text(load_prompts(str(a))[0]) == prompt_text(load_prompts(str(b))[0]) == "name a prime number."


@pytest.mark.parametrize(("sets", "needle"), [
    (["nope"], "unknown nope (evaluation sets are dolly"),
    (["dolly=x.jsonl"], "dolly is a built-in set"),
    (["my set=x.jsonl"], "the NAME of NAME=PATH"),
    (["../up=x.jsonl"], "the NAME of NAME=PATH"),
    (["=x.jsonl"], "the NAME of NAME=PATH"),
    (["mine="], "give the PATH"),
    (["mine=a.jsonl", "mine=b.jsonl"], "two evaluation sets are named mine"),
])
def test_bad_set_entries_name_the_key(sets, needle):
    with pytest.raises(ValueError, match="sets") as e:
        EvalConfig(sets=sets)
    assert needle in str(e.value)
    with pytest.raises(DadpoError) as e:
        validate_recipe({"name": "r", "output_dir": "o", "student": "s", "evaluate": {"sets": sets}}, "r.yaml")
    assert str(e.value).startswith("r.yaml: evaluate.sets: ") and needle in str(e.value) and "\n" not in str(e.value)


def _bad_json(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    return path


def _unknown_format(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "odd.jsonl", [{"question": "no prompt field"}])


@pytest.mark.parametrize(("sets", "needle"), [
    (lambda t: "bogus", "sets: unknown bogus"),
    (lambda t: "vicuna_bench,dolly=x.jsonl", "dolly is a built-in set"),
    (lambda t: "bad name=x.jsonl", "the NAME of NAME=PATH"),
    (lambda t: f"mine={t / 'a.jsonl'},mine={t / 'b.jsonl'}", "two evaluation sets are named mine"),
    (lambda t: f"mine={t / 'missing.jsonl'}", "evaluation set 'mine': {t}/missing.jsonl not found"),
    (lambda t: f"mine={_bad_json(t)}", "evaluation set 'mine': dataset {t}/bad.jsonl: not valid JSON at line 2"),
    (lambda t: f"mine={_unknown_format(t)}", "evaluation set 'mine': unknown dataset format (fields: question)"),
])
def test_cli_bad_sets_are_one_line_exit_2_and_write_nothing(capsys, tmp_path, no_model, sets, needle):
    work = tmp_path / "work"
    work.mkdir()
    entry = sets(work)
    before = sorted(p.name for p in work.iterdir())
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "evaluate", "--students", "smollm2-135m-instruct", "--teacher",
                           "smollm2-135m-instruct", "--out", str(out), "--sets", entry, "--judge", "none")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dadpo evaluate: error: "), err
    assert needle.format(t=work) in lines[0], lines[0]
    assert not out.exists() and sorted(p.name for p in work.iterdir()) == before


def test_recipe_with_a_missing_set_file_fails_its_dry_run(capsys, tmp_path, data_aliases):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "run"
    recipe.write_text(f"name: r\noutput_dir: {out}\nstudent: smollm2-135m-instruct\n"
                      f"evaluate:\n  sets: [vicuna_bench, 'mine={tmp_path / 'nope.jsonl'}']\n  judge: null\n")
    code, _, err = run_cli(capsys, "run", str(recipe), "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"evaluate.sets: evaluation set 'mine': {tmp_path / 'nope.jsonl'} not found" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_dir) -> str:
    """A tiny random-init Llama chat model on disk (SmolLM2's tokenizer): the run's mechanics in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(smollm_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_evaluate_answers_and_scores_a_set_of_ones_own_under_its_name(capsys, tmp_path, mine, tiny_dir):
    out = tmp_path / "eval"
    code, _, err = run_cli(capsys, "evaluate", "--students", f"s={tiny_dir}", "--teacher", tiny_dir, "--sets",
                           f"mine={mine}", "--limit", "2", "--max-new-tokens", "3", "--seeds", "10",
                           "--judge", "none", "--bootstrap", "0", "--out", str(out))
    assert code == 0, err
    names = [p.name for p in (out / "answers").glob("*/*.jsonl")]
    assert names and all(n.split(".")[0] == "mine" for n in names), names  # answers/<model>/mine[.seed10].jsonl
    res = json.loads((out / "results.json").read_text())
    assert "mine" in res["students"]["s"]["rouge"] and res["config"]["sets"] == [f"mine={mine}"]
