"""Prompt ids are unique: a set in which two rows share an id is refused (answers are keyed by id, so one
prompt would silently be answered twice and the other never)."""

from __future__ import annotations

import json

import pytest

from dadpo.data import ALIASES, load_prompts
from dadpo.errors import DadpoError


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_refuses_duplicate_ids_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import dadpo.models
    from dadpo.cli import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the prompts were checked")

    monkeypatch.setattr(dadpo.models, "load_model", no_model)
    dup = _rows(tmp_path / "dup.jsonl", [{"id": "1", "prompt": "What is 2 + 2?"}, {"id": "1", "prompt": "A fruit?"}])
    out = tmp_path / "x.jsonl"
    assert main(["generate", "--prompts", str(dup), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dup) in err and "duplicate prompt id '1'" in err, err
    assert not out.exists() and not out.with_name("x.jsonl.part").exists()


def test_every_repeated_id_is_named_and_row_positions_are_unique_ids(tmp_path):
    many = _rows(tmp_path / "many.jsonl", [{"id": str(i % 7), "prompt": f"q{i}"} for i in range(14)])
    with pytest.raises(DadpoError, match=r"many.jsonl: duplicate prompt id '0' \(2 rows\), .* and 2 more"):
        load_prompts(str(many))
    # a row without an id takes its position, which may collide with another row's explicit id
    mixed = _rows(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"id": "0", "prompt": "b"}])
    with pytest.raises(DadpoError, match="duplicate prompt id '0'"):
        load_prompts(str(mixed))
    no_ids = _rows(tmp_path / "plain.jsonl", [{"prompt": "same"}, {"prompt": "same"}])
    assert [r.id for r in load_prompts(str(no_ids))] == ["0", "1"]  # identical prompts are still two rows


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_bundled_sets_have_unique_ids(data_aliases, alias):
    records = load_prompts(alias)  # raises on a repeated id
    assert len({r.id for r in records}) == len(records) > 0
