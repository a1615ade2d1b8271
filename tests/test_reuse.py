"""Content-addressed reuse: each artefact's key changes when, and only when, something it is made from
changes — one test per artefact kind (recover's shared artefacts, evaluation answers, evaluation metrics,
pipeline stages)."""

from __future__ import annotations

import copy
from typing import Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from dadpo.recover.artefacts import FINAL_ONLY, SHARED, artefact_keys
from dadpo.recover.config import LoraConfig, RecoverConfig

# What each recover step reads, written down from the steps themselves (pipeline.run_recover and the
# functions it calls), independently of artefact_keys.
PROMPTS = {"prompts", "skip_prompts", "eval_prompts", "train_prompts"}
SAMPLING = {f"sampling.{k}" for k in ("max_new_tokens", "temperature", "top_p", "batch_size", "precision")}
TEACHER = {"teacher", "seed", *PROMPTS, *SAMPLING}  # teacher answers to every kept prompt
FORWARD = {"max_prompt_len", "max_response_len", "batch_size", "bf16", "group_by_length"}  # every batched forward
DSFT = TEACHER | FORWARD | {"student", "grad_accum", "warmup_ratio", "dsft.lr", "dsft.epochs",
                            *(f"lora.{k}" for k in LoraConfig.model_fields)}
STUDENT = DSFT | {"sampling.student_from"}  # the dSFT model's answers (the paper's rejected responses)
EXPECTED = {
    "teacher.jsonl": TEACHER,
    "start_nll.json": TEACHER | FORWARD | {"student"},
    "dsft": DSFT,
    "dsft_nll.json": DSFT,
    "student.jsonl": STUDENT,
    # what the scores hold (rejected log-probs, top-k of which k) is checked on the file (`scores_fit`)
    "scores.pt": DSFT,
}


def leaves(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Dotted field path → annotation of every leaf setting (LoRA's included)."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        out.update(leaves(sub[0], f"{prefix}{name}.") if sub else {f"{prefix}{name}": ann})
    return out


def changed(value, ann):
    """Another valid value of a setting."""
    if get_origin(ann) is Literal:
        return next(c for c in get_args(ann) if c != value and c != "wandb")
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, list):
        return [*value[:-1]]
    return 5 if value is None else value + "-other"


def manifest(**config) -> dict:
    cfg = RecoverConfig.model_validate({"method": "dadpo", "lora": {}, **config})
    return {"student": {"spec": "s", "weights": "1"}, "teacher": {"spec": "t", "weights": "2"}, "prompts": "dolly",
            "config": cfg.model_dump(mode="json")}


def keys_changed_by(path: str, base: dict) -> set[str]:
    other = copy.deepcopy(base)
    node, *rest = path.split(".")
    if not rest:
        target, key = (other if node in ("student", "teacher", "prompts") else other["config"]), node
    else:
        target, key = other["config"][node], rest[0]
    ann = leaves(RecoverConfig).get(path, str)
    target[key] = changed(target[key], ann) if key in target and not isinstance(target[key], dict) else (
        {**target[key], "weights": "other"})
    ours, theirs = artefact_keys(base), artefact_keys(other)
    return {name for name in SHARED if ours[name] != theirs[name]}


FIELDS = ["student", "teacher", "prompts", *leaves(RecoverConfig)]


@pytest.mark.parametrize("path", FIELDS)
def test_a_shared_artefact_key_changes_exactly_when_something_it_is_made_from_changes(path):
    bases = [manifest(), manifest(kd={"weight": 0.5}), manifest(sampling={"student_from": "student"})]
    got = set().union(*(keys_changed_by(path, b) for b in bases))
    assert got == {name for name, inputs in EXPECTED.items() if path in inputs}, path


def test_final_only_lists_exactly_the_settings_in_no_key():
    """A new setting in neither FINAL_ONLY nor a key fails the test above until it is placed."""
    read = set().union(*EXPECTED.values())
    assert set(FINAL_ONLY) == {f for f in FIELDS if f not in read}


def test_scores_serve_a_run_when_they_hold_what_its_method_needs():
    import torch

    from dadpo.recover.artefacts import scores_fit

    def config(**kw):
        return RecoverConfig.model_validate(kw)

    both = {"1": {"ref_rejected_logps": torch.zeros(1), "topk_ids": torch.zeros(3, 4)}}
    pairs_only = {"1": {"ref_rejected_logps": torch.zeros(1)}}
    assert scores_fit(both, config(method="kd", kd={"top_k": 4})) and scores_fit(both, config(method="dpo"))
    assert not scores_fit(both, config(method="kd", kd={"top_k": 8}))
    assert not scores_fit(pairs_only, config(method="dadpo", kd={"weight": 0.5, "top_k": 4}))
    assert scores_fit(pairs_only, config(method="dsft")) and not scores_fit({"1": {}}, config(method="dpo"))
    keys = {m: artefact_keys(manifest(method=m)) for m in ("dsft", "kd", "dpo", "dadpo")}
    assert len({k["dsft"] for k in keys.values()}) == len({k["scores.pt"] for k in keys.values()}) == 1


def test_student_answers_follow_the_model_that_samples_them():
    raw = manifest(sampling={"student_from": "student"})
    assert keys_changed_by("dsft.lr", raw) == {"dsft", "dsft_nll.json", "scores.pt"}  # not student.jsonl
    assert keys_changed_by("dsft.lr", manifest()) == {"dsft", "dsft_nll.json", "scores.pt", "student.jsonl"}


def test_answer_key_is_the_model_stamp_and_the_decoding_settings():
    from dadpo.decoding import GenerationConfig
    from dadpo.generation import answer_key

    row = {"id": "1", "response": "a", "model": {"spec": "m", "weights": "w"},
           "generation": GenerationConfig().model_dump()}
    assert answer_key(row) == answer_key({**row, "id": "2", "response": "b"})
    assert answer_key(row) != answer_key({**row, "model": {"spec": "m", "weights": "w2"}})
    for field in GenerationConfig.model_fields:
        other = {**row["generation"], field: changed(row["generation"][field],
                                                     GenerationConfig.model_fields[field].annotation)}
        assert answer_key(row) != answer_key({**row, "generation": other}), field


def test_stage_hash_follows_config_upstream_and_weights(monkeypatch):
    from dadpo import pipeline

    monkeypatch.setattr("dadpo.models.model_fingerprint", lambda m: f"fp-{m}")
    stage = pipeline.Stage("recover", {"beta2": 0.1}, run=lambda d, r: {}, upstream=["prune"], models=["t"])
    base = pipeline.stage_hash(stage, {"prune": "aaaa"})
    assert base == pipeline.stage_hash(stage, {"prune": "aaaa", "other": "x"})
    assert base != pipeline.stage_hash(stage, {"prune": "bbbb"})
    assert base != pipeline.stage_hash(pipeline.Stage("recover", {"beta2": 0.2}, stage.run, ["prune"], ["t"]),
                                       {"prune": "aaaa"})
    monkeypatch.setattr("dadpo.models.model_fingerprint", lambda m: f"fp2-{m}")
    assert base != pipeline.stage_hash(stage, {"prune": "aaaa"})
