"""The seven zero-shot tasks: local-file conversion and a real lm-eval run on an in-memory model."""

from __future__ import annotations

import json

import pytest
import torch

from dadpo.errors import DadpoError
from dadpo.evaluate.zeroshot import TASKS, check_tasks, prepare_local_tasks, run_zeroshot

#: full split sizes (../shared/data/README.md)
SIZES = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
         "arc_challenge": 1172, "openbookqa": 500}


def test_local_conversion_keeps_every_item_with_a_valid_gold(data_dir, tmp_path):
    folder = prepare_local_tasks(list(TASKS), data_dir, tmp_path)
    for task, size in SIZES.items():
        rows = [json.loads(x) for x in (folder / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == size, task
        options = "contexts" if task == "winogrande" else "choices"
        assert all(0 <= r["gold"] < len(r[options]) for r in rows), task
        assert (folder / f"dadpo_{task}.yaml").is_file()
    boolq = json.loads((folder / "boolq.jsonl").read_text().splitlines()[0])
    assert boolq["query"].endswith("?\nAnswer:") and boolq["choices"] == ["no", "yes"]
    wino = json.loads((folder / "winogrande.jsonl").read_text().splitlines()[0])
    assert wino["contexts"][0].endswith("Sarah") and "_" not in wino["continuation"]
    arc = json.loads((folder / "arc_easy.jsonl").read_text().splitlines()[0])
    assert arc["query"].startswith("Question: ") and arc["query"].endswith("\nAnswer:")


def test_unknown_task_is_one_line_error():
    with pytest.raises(DadpoError, match="unknown zero-shot task.*mmlu"):
        check_tasks(["piqa", "mmlu"])


def test_converted_tasks_belong_to_their_data_dir(data_dir, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(data_dir / "openbookqa", other / "openbookqa")
    rows = (other / "openbookqa/test.jsonl").read_text().splitlines()
    (other / "openbookqa/test.jsonl").write_text("\n".join(rows[:7]) + "\n")
    work = tmp_path / "work"
    full = prepare_local_tasks(["openbookqa"], data_dir, work) / "openbookqa.jsonl"
    small = prepare_local_tasks(["openbookqa"], other, work) / "openbookqa.jsonl"
    assert len(full.read_text().splitlines()) == 500 and len(small.read_text().splitlines()) == 7


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(DadpoError, match="piqa"):
        prepare_local_tasks(["piqa"], tmp_path / "nowhere", tmp_path / "work")


@pytest.fixture(scope="module")
def tiny_lm(smollm_dir):
    """A tiny random-init Llama with SmolLM2's real tokenizer (mechanics only, scores near chance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(smollm_dir))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


def test_lm_eval_on_in_memory_model_with_limit(tiny_lm, data_dir, tmp_path):
    model, tok = tiny_lm
    res = run_zeroshot(model, tok, ["winogrande", "arc_easy", "boolq"], data_dir=data_dir, work_dir=tmp_path,
                       limit=4, batch_size=4)
    assert set(res) == {"winogrande", "arc_easy", "boolq"}
    for task, row in res.items():
        assert row["n"] == 4, task
        assert 0 <= row["acc"] <= 1
        assert ("acc_norm" in row) == (task == "arc_easy")  # like lm-eval's own boolq/winogrande: acc only
    assert tok.padding_side == "left"  # the generation setting survives lm-eval


def test_request_cache_makes_a_rerun_free(tiny_lm, data_dir, tmp_path, monkeypatch):
    model, tok = tiny_lm
    kw = dict(data_dir=data_dir, work_dir=tmp_path / "tasks", limit=3, batch_size=4, cache=tmp_path / "c" / "tiny")
    first = run_zeroshot(model, tok, ["arc_easy", "boolq"], **kw)
    assert (tmp_path / "c" / "tiny_rank0.db").is_file()

    def no_model_calls(*args, **kwargs):
        raise AssertionError("the model ran although every request was cached")

    monkeypatch.setattr(model, "forward", no_model_calls)
    assert run_zeroshot(model, tok, ["arc_easy", "boolq"], **kw) == first


@pytest.mark.slow
def test_smollm_beats_chance_on_arc_easy(smollm, data_dir, tmp_path):
    model, tok = smollm
    res = run_zeroshot(model, tok, ["arc_easy"], data_dir=data_dir, work_dir=tmp_path, limit=200)
    assert res["arc_easy"]["acc"] > 0.4  # 4 choices: chance is 0.25


def test_metrics_file_replaces_the_request_cache(tiny_lm, data_dir, tmp_path):
    from dadpo.evaluate.answers import model_slug
    from dadpo.evaluate.config import EvalConfig
    from dadpo.evaluate.run import model_metrics

    model, tok = tiny_lm
    cfg = EvalConfig(tasks=["boolq"], task_limit=2, ppl_corpora=[], data_dir=str(data_dir))
    metrics = model_metrics(model, tok, "tiny", "/m/tiny", tmp_path, cfg, progress=False)
    assert metrics["zeroshot"]["boolq"]["n"] == 2
    # the request cache served a resume only: once the metrics file holds the results it is deleted
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == [f"{model_slug('tiny', '/m/tiny')}.json"]
