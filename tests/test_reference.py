"""ROUGE-L against references, seed summaries, paired differences and degeneration diagnostics: hand values."""

from __future__ import annotations

import pytest

from dadpo.evaluate.reference import (
    diagnostics,
    loops,
    paired_difference,
    prompt_scores,
    rouge_l,
    seed_average,
    seed_summary,
)


def test_rouge_l_hand_values():
    # LCS "the cat" = 2: P = 2/3, R = 2/6, F = 2PR / (P + R) = 4/9
    assert rouge_l("the cat ran", "the cat sat on the mat") == pytest.approx(100 * 4 / 9)
    assert rouge_l("dogs bark", "the cat sat on the mat") == 0.0
    assert rouge_l("anything", None) is None and rouge_l("anything", ["", "  "]) is None


def test_rouge_l_stems_and_ignores_case_and_punctuation():
    # without stemming "cats"/"cat" differ: LCS 5 of 6 each side = 83.3; Porter stemming makes them equal
    assert rouge_l("The cats sat on the mat!", "the cat sat on the mat") == pytest.approx(100.0)
    assert rouge_l("running quickly", "runs quick") == pytest.approx(50.0)  # run = run; quickli ≠ quick


def test_rouge_l_takes_the_best_reference():
    # against "dogs bark": LCS 2, P = 2/3, R = 1, F = 0.8; against "the cat sat": 0
    assert rouge_l("dogs bark loudly", ["the cat sat", "dogs bark"]) == pytest.approx(80.0)


def test_prompt_scores_use_the_first_answer_and_skip_rows_without_reference():
    rows = [{"id": "a", "responses": ["the cat sat on the mat", "later turn"], "reference": "the cat sat on the mat"},
            {"id": "b", "response": "dogs bark", "reference": "dogs bark"},
            {"id": "c", "response": "x", "reference": None}]
    assert prompt_scores(rows) == {"a": pytest.approx(100.0), "b": pytest.approx(100.0)}


def test_seed_summary_is_mean_and_std_over_seed_means():
    per_seed = {10: {"a": 10.0, "b": 20.0}, 20: {"a": 30.0, "b": 40.0}}
    s = seed_summary(per_seed, samples=200)
    assert s["per_seed"] == {"10": 15.0, "20": 35.0}
    assert s["mean"] == pytest.approx(25.0) and s["std"] == pytest.approx(14.1421356)
    assert s["n"] == 2 and s["seeds"] == 2
    assert 20.0 <= s["ci95"][0] <= s["ci95"][1] <= 30.0  # bootstrap over the seed-averaged prompts 20 and 30
    assert seed_average(per_seed) == {"a": 20.0, "b": 30.0}
    assert seed_summary({10: {"a": 5.0, "b": 7.0}}, samples=0) == {
        "mean": 6.0, "std": 0.0, "per_seed": {"10": 6.0}, "ci95": None, "n": 2, "seeds": 1}


def test_paired_difference_uses_common_prompts_and_cancels_shared_spread():
    a = {"x": 1.0, "y": 51.0, "z": 101.0, "only_a": 9.0}
    b = {"x": 0.0, "y": 50.0, "z": 100.0}
    d = paired_difference(a, b, samples=500)
    assert d["n"] == 3 and d["delta"] == pytest.approx(1.0)
    assert d["ci95"] == pytest.approx([1.0, 1.0])  # every prompt differs by 1: no spread left to resample
    d = paired_difference({"x": 1.0, "y": 3.0}, {"x": 0.0, "y": 1.0}, samples=500)
    assert d["delta"] == pytest.approx(1.5) and 1.0 <= d["ci95"][0] <= d["ci95"][1] <= 2.0


def test_loops_and_diagnostics_on_hand_made_answers():
    looping = "I am a bot. I am a bot. I am a bot. I am a bot."
    assert loops(looping) and not loops("one two three four one two three four five")
    rows = [{"response": looping, "responses": [looping], "new_tokens": 16, "finish_reason": "length"},
            {"response": "a b c", "responses": ["a b c"], "new_tokens": 4, "finish_reason": "stop"}]
    d = diagnostics(rows)
    assert d["answers"] == 2 and d["mean_tokens"] == 10 and d["hit_cap"] == 50 and d["loops"] == 50
    # words: i am a bot ×4 + a b c → 19 unigrams, distinct {i, am, a, bot, b, c} = 6
    assert d["distinct_1"] == pytest.approx(100 * 6 / 19)
    # bigrams: 15 in the loop (distinct: i-am, am-a, a-bot, bot-i = 4) + 2 (a-b, b-c) → 6 of 17
    assert d["distinct_2"] == pytest.approx(100 * 6 / 17)
    assert diagnostics([]) == {"answers": 0}
