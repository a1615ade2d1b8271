"""The bench table: pooled preference, the local judge's calibrated column, zero-shot average, plot."""

from __future__ import annotations

from dadpo.bench import bench_rows, markdown_table, write_bench


def summary(value: float, n: int, ci=(-10.0, 10.0)) -> dict:
    return {"n": n, "flip_rate": 100.0, "preference": {"value": value, "ci95": list(ci)}}


def results(calibrated: bool) -> dict:
    block = {"params": 107_558_208, "rouge": {"dolly": {"rougeL": 20.0}},
             "zeroshot": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "hellaswag": {"acc": 0.3, "acc_norm": 0.4}},
             "perplexity": [{"corpus": "wikitext2", "ppl": 150.0, "seq_len": 128}]}
    pair = {"vicuna_bench": {"overall": summary(0.0, 24, (0.0, 0.0))}}
    if calibrated:
        pair["vicuna_bench"]["calibrated"] = summary(-25.0, 24, (-50.0, 0.0))
    return {"teacher": {**block, "params": 134_515_008}, "students": {"dadpo": block},
            "pairwise": {"dadpo": pair}}


def test_rows_pool_sets_and_average_the_task_metric():
    two_sets = results(False)
    two_sets["pairwise"]["dadpo"]["dolly"] = {"overall": summary(30.0, 8)}
    teacher, row = bench_rows(two_sets)
    assert teacher["method"] == "teacher" and "preference" not in teacher
    assert row["preference"] == 7.5 and row["preference_ci95"] is None  # (0·24 + 30·8) / 32; no CI when pooled
    assert row["zeroshot_avg"] == 50.0 and row["zeroshot_tasks"] == 2  # piqa acc 60, hellaswag acc_norm 40
    assert row["wikitext2_ppl"] == 150.0 and row["rougeL"] == 20.0
    # a set whose verdicts were all invalid (n = 0; its rate read back from results.json as null) has no weight
    two_sets["pairwise"]["dadpo"]["mt_bench"] = {"overall": {"n": 0, "preference": {"value": None, "ci95": None}}}
    assert bench_rows(two_sets)[1]["preference"] == 7.5
    only_invalid = {"mt_bench": two_sets["pairwise"]["dadpo"]["mt_bench"]}
    assert "| dadpo | 107.6 | — |" in markdown_table(bench_rows({**two_sets, "pairwise": {"dadpo": only_invalid}}))


def test_table_shows_the_calibrated_column_only_for_local_judges(tmp_path):
    assert "calibrated" not in markdown_table(bench_rows(results(False)))
    table = write_bench(tmp_path, results(True), "dadpo bench x.yaml")
    assert "| dadpo | 107.6 | 0.0 [0.0, 0.0] | -25.0 [-50.0, 0.0] | 20.0 | 50.0 | 150.00 |" in table
    assert (tmp_path / "table.md").read_text().startswith("Command: `dadpo bench x.yaml`")
    assert (tmp_path / "preference.png").stat().st_size > 1000
