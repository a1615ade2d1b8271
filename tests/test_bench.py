"""The bench table: pooled preference, the local judge's calibrated column, zero-shot average, plot."""

from __future__ import annotations

import pytest

from dadpo.bench import bench_rows, markdown_table, write_bench


def summary(value: float, n: int, ci=(-10.0, 10.0)) -> dict:
    return {"n": n, "flip_rate": 100.0, "preference": {"value": value, "ci95": list(ci)}}


def results(calibrated: bool) -> dict:
    block = {"params": 107_558_208, "rouge": {"dolly": {"mean": 20.0, "std": 1.0}},
             "zeroshot": {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "hellaswag": {"acc": 0.3, "acc_norm": 0.4}},
             "perplexity": [{"corpus": "wikitext2", "ppl": 150.0, "seq_len": 128}]}
    pair = {"vicuna_bench": {"overall": summary(0.0, 24, (0.0, 0.0))}}
    if calibrated:
        pair["vicuna_bench"]["calibrated"] = summary(-25.0, 24, (-50.0, 0.0))
    return {"teacher": {**block, "params": 134_515_008}, "students": {"dadpo": block},
            "pairwise": {"dadpo": pair}, "comparisons": []}


def test_rows_pool_sets_and_average_the_task_metric():
    two_sets = results(False)
    two_sets["pairwise"]["dadpo"]["dolly"] = {"overall": summary(30.0, 8)}
    teacher, row = bench_rows(two_sets)
    assert teacher["method"] == "teacher" and "preference" not in teacher
    assert row["preference"] == 7.5 and row["preference_ci95"] is None  # (0·24 + 30·8) / 32; no CI when pooled
    assert row["zeroshot_avg"] == 50.0 and row["zeroshot_tasks"] == 2  # piqa acc 60, hellaswag acc_norm 40
    assert row["wikitext2_ppl"] == 150.0 and row["rouge"] == {"dolly": {"mean": 20.0, "std": 1.0}}
    # a set whose verdicts were all invalid (n = 0; its rate read back from results.json as null) has no weight
    two_sets["pairwise"]["dadpo"]["mt_bench"] = {"overall": {"n": 0, "preference": {"value": None, "ci95": None}}}
    assert bench_rows(two_sets)[1]["preference"] == 7.5
    only_invalid = {"mt_bench": two_sets["pairwise"]["dadpo"]["mt_bench"]}
    table = markdown_table(bench_rows({**two_sets, "pairwise": {"dadpo": only_invalid}}))
    assert "| dadpo | 107.6 | 20.0 ± 1.0 | — |" in table


def test_zero_shot_avg_carries_its_95_interval():
    """bench's zero-shot avg is report.md's mean (`zeroshot_summary`) with the same pooled 95% interval."""
    res = results(False)
    zs = res["students"]["dadpo"]["zeroshot"]
    res["students"]["dadpo"] = {**res["students"]["dadpo"], "zeroshot": {"piqa": {**zs["piqa"], "n": 100},
                                                                          "hellaswag": {**zs["hellaswag"], "n": 24}}}
    row = bench_rows(res)[1]
    half = 1.96 * ((100 * (0.24 / 100) ** 0.5) ** 2 + 10.0**2) ** 0.5 / 2  # SEs: piqa acc 60 (n 100), hellaswag 10
    assert row["zeroshot_avg"] == 50.0 and row["zeroshot_avg_ci95"] == pytest.approx([50 - half, 50 + half])
    table = markdown_table(bench_rows(res))
    assert "zero-shot avg (%) ± 95%" in table and f"| 0.0 [0.0, 0.0] | 50.0 ± {half:.1f} | 150.00 |" in table
    assert "| teacher | 134.5 | 20.0 ± 1.0 | — | 50.0 | 150.00 |" in table  # without n: no interval to claim


def test_table_shows_the_calibrated_column_only_for_local_judges(tmp_path):
    assert "calibrated" not in markdown_table(bench_rows(results(False)))
    table = write_bench(tmp_path, results(True), "dadpo bench x.yaml")
    assert "| dadpo | 107.6 | 20.0 ± 1.0 | 0.0 [0.0, 0.0] | -25.0 [-50.0, 0.0] | 50.0 | 150.00 |" in table
    assert (tmp_path / "table.md").read_text().startswith("Command: `dadpo bench x.yaml`")
    assert (tmp_path / "preference.png").stat().st_size > 1000


def test_an_invalid_judge_shows_its_reason_instead_of_a_preference(tmp_path):
    """A judge that answers [[A]] to everything: the table and plot print why instead of its preference, which
    stays in bench.json, flagged; the calibrated log-prob reading stays, marked. Pooled over sets, a set judged
    by content can bring the judge back under the limits."""
    import json

    from dadpo.evaluate.stats import judge_validity

    res = results(True)
    res["pairwise"]["dadpo"]["vicuna_bench"]["validity"] = judge_validity([("A", "A")] * 24)
    table = write_bench(tmp_path, res, "dadpo bench x.yaml")
    flag = "judge invalid (flip rate 100%; [[A]] for 100% of prompts with the student shown first)"
    assert f"| dadpo | 107.6 | 20.0 ± 1.0 | {flag} | -25.0 [-50.0, 0.0]† |" in table
    assert "\n† position-calibrated log-prob reading of a judge whose verdicts failed" in table
    row = json.loads((tmp_path / "bench.json").read_text())["rows"][1]
    assert row["preference"] == 0.0 and row["judge_invalid"] == flag and row["judge_validity"]["valid"] is False
    assert (tmp_path / "preference.png").stat().st_size > 1000
    res["pairwise"]["dadpo"]["dolly"] = {"overall": summary(30.0, 26), "calibrated": summary(10.0, 26),
                                         "validity": judge_validity([("A", "B"), ("B", "A")] * 13)}
    row = bench_rows(res)[1]
    assert row["flip_rate"] == 48.0 and row["judge_invalid"] is None  # 24 flips in 50 pairs
    assert "judge invalid" not in markdown_table([row]) and "†" not in markdown_table([row])


def test_rouge_columns_show_the_paired_difference_from_the_baseline():
    res = results(False)
    res["students"] = {"none": res["students"]["dadpo"], "dadpo": {**res["students"]["dadpo"],
                                                                     "rouge": {"dolly": {"mean": 22.5, "std": 0.4}}}}
    res["pairwise"] = {}
    res["comparisons"] = [{"set": "dolly", "a": "teacher", "b": "none", "delta": 3.0, "ci95": [1.0, 5.0], "n": 80},
                          {"set": "dolly", "a": "dadpo", "b": "none", "delta": 2.5, "ci95": [-0.25, 4.0], "n": 80},
                          {"set": "dolly", "a": "dadpo", "b": "teacher", "delta": -0.5, "ci95": [-2.0, 1.0], "n": 80}]
    rows = bench_rows(res)
    assert rows[2]["rouge_delta"] == {"dolly": {"vs": "none", "delta": 2.5, "ci95": [-0.25, 4.0]}}
    table = markdown_table(rows)
    assert "| method | params (M) | ROUGE-L dolly ± std | Δ vs none [95% CI] |" in table
    assert "| none | 107.6 | 20.0 ± 1.0 | baseline |" in table
    assert "| dadpo | 107.6 | 22.5 ± 0.4 | +2.5 [-0.2, +4.0] |" in table  # not the extra dadpo − teacher pair
    assert "| teacher | 134.5 | 20.0 ± 1.0 | +3.0 [+1.0, +5.0] |" in table


# -- method variants: `--methods dadpo@beta2=0.003,…` -----------------------------------------------------------

def test_variants_set_any_recover_field_and_run_after_their_dsft():
    from dadpo.pipeline import bench_variants, split_methods
    from dadpo.recover.config import RecoverConfig

    items = split_methods("dadpo@margin=mean@beta2=0.01, none,dpo,dadpo@lora.target_modules=[q_proj,v_proj],dsft")
    assert items == ["dadpo@margin=mean@beta2=0.01", "none", "dpo", "dadpo@lora.target_modules=[q_proj,v_proj]",
                     "dsft"]
    base = RecoverConfig(beta1=0.2, lr=1e-6).model_dump(mode="json")
    variants = dict(bench_variants(items, base))
    assert list(variants) == ["none", "dsft", "dpo", "dadpo@margin=mean@beta2=0.01",
                              "dadpo@lora.target_modules=[q_proj,v_proj]"]
    assert variants["none"] is None
    mean = variants["dadpo@margin=mean@beta2=0.01"]
    assert (mean.method, mean.margin, mean.beta2, mean.beta1, mean.lr) == ("dadpo", "mean", 0.01, 0.2, 1e-6)
    assert variants["dadpo@lora.target_modules=[q_proj,v_proj]"].lora.target_modules == ["q_proj", "v_proj"]
    assert variants["dpo"].method == "dpo" and variants["dpo"].margin == "sum"


@pytest.mark.parametrize(("methods", "message"), [
    ("dadpo@beta3=1", "--methods dadpo@beta3=1: recover.beta3: unknown key; did you mean beta2?"),
    ("dadpo@beta2=-1", "--methods dadpo@beta2=-1: recover.beta2: must be > 0, got -1.0"),
    ("dadpo@margin=median", "--methods dadpo@margin=median: recover.margin: Input should be 'sum' or 'mean'"),
    ("dadpo@beta2", "--methods dadpo@beta2: 'beta2': expected KEY.PATH=VALUE"),
    ("dpo@method=kd", "--methods dpo@method=kd: the method is the name before @, not a setting"),
    ("none@beta2=1", "--methods none@beta2=1: none (no recovery) takes no settings"),
    ("dadpo,dadpo", "--methods: dadpo is listed twice"),
    ("orpo@beta=1", "--methods: unknown method 'orpo' in 'orpo@beta=1'"),
    (" , ", "--methods: none given"),
])
def test_bad_variants_are_one_line_before_anything_runs(methods, message, capsys, tmp_path, no_model):
    from conftest import run_cli

    code, _, err = run_cli(capsys, "bench", "recipes/smollm2-135m-prune20-dadpo.yaml", "--methods", methods,
                           "--out", str(tmp_path / "run"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_variants_become_recover_stages_that_share_the_method_independent_work(tmp_path):
    from dadpo.pipeline import bench_plan
    from dadpo.recipe import load_recipe
    from dadpo.recover.artefacts import artefact_keys
    from dadpo.recover.config import RecoverConfig

    recipe = load_recipe("recipes/smollm2-135m-prune20-dadpo.yaml", [f"output_dir={tmp_path}"])
    stages = bench_plan(recipe, ["none", "dpo", "dadpo@beta2=0.003", "dadpo@margin=mean", "dadpo@seed=1"])
    names = [s.name for s in stages]
    assert names == ["prune", "bench/recover-dpo", "bench/recover-dadpo@beta2=0.003", "bench/recover-dadpo@margin=mean",
                     "bench/recover-dadpo@seed=1", "bench/evaluate"]
    evaluate = stages[-1].config["students"]
    assert list(evaluate) == ["none", "dpo", "dadpo@beta2=0.003", "dadpo@margin=mean", "dadpo@seed=1"]
    assert evaluate["dadpo@margin=mean"] == str(tmp_path / "bench" / "recover-dadpo@margin=mean" / "model")
    keys = [artefact_keys({**{k: s.config[k] for k in ("teacher", "student", "prompts")},
                           "config": {k: s.config[k] for k in RecoverConfig.model_fields}}) for s in stages[1:5]]
    assert keys[0] == keys[1] == keys[2]  # β and margin share every artefact
    assert all(keys[3][name] != keys[0][name] for name in keys[0])  # another seed samples and trains anew
