"""EvalConfig validation, the `dadpo evaluate` command, and an end-to-end cached run on SmolLM2."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from conftest import run_cli
from dadpo.errors import DadpoError
from dadpo.evaluate import EvalConfig, run_evaluate
from dadpo.evaluate.answers import load_eval_set, pair_items


def test_config_defaults_and_recipe_section():
    cfg = EvalConfig()
    assert cfg.sets == ["dolly", "vicuna_bench"] and cfg.judge.kind == "local"
    g = cfg.generation  # MiniLLM's protocol: pure sampling, 256 new tokens, several seeds
    assert (g.temperature, g.top_p, g.max_new_tokens, cfg.seeds) == (1.0, 1.0, 256, [10, 20, 30])
    cfg = EvalConfig.model_validate(
        {
            "sets": ["dolly", "mt_bench"],
            "tasks": ["piqa", "boolq"],
            "limit": 5,
            "judge": {
                "kind": "openai",
                "model": "gpt-4o",
                "base_url": "http://x/v1",
                "api_key_env": "JUDGE_API_KEY",
                "concurrency": 8,
            },
        }
    )
    assert cfg.judge.concurrency == 8 and cfg.tasks == ["piqa", "boolq"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"sets": ["dolly", "nope"]}, "sets"),
        ({"tasks": ["mmlu"]}, "tasks"),
        ({"limit": 0}, "limit"),
        ({"seq_lens": [1]}, "seq_lens"),
        ({"judge": {"kind": "claude"}}, "judge.kind"),
        ({"judge": {"base_url": "ftp://x"}}, "judge.base_url"),
        ({"judge": {"concurrency": 0}}, "judge.concurrency"),
        ({"bogus": 1}, "bogus"),
        ({"generation": {"top_p": 2}}, "generation.top_p"),
    ],
)
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ValidationError) as e:
        EvalConfig.model_validate(data)
    err = e.value.errors()[0]
    assert ".".join(str(x) for x in err["loc"]) == field
    if field in ("sets", "tasks"):
        assert field in err["msg"]


def test_dolly_is_the_held_out_head(data_aliases):
    recs = load_eval_set("dolly")
    assert len(recs) == 80 and len({r.category for r in recs}) == 8
    assert len(load_eval_set("mt_bench", 3)) == 3
    with pytest.raises(DadpoError, match="unknown evaluation set"):
        load_eval_set("lima")


def test_pair_items_cover_both_orders_and_every_turn():
    def row(who: str) -> dict:
        msgs = [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": f"{who}1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": f"{who}2"},
        ]
        return {
            "id": "7",
            "category": "c",
            "messages": msgs,
            "responses": [f"{who}1", f"{who}2"],
            "reference": "r",
        }

    triples = pair_items("mt_bench", [row("s")], [row("t")])
    assert [m["turn"] for m, _, _ in triples] == [1, 2]
    meta, s_first, t_first = triples[1]
    assert s_first.conv_a[-1]["content"] == "s2" and s_first.conv_a[1]["content"] == "s1"
    assert t_first.conv_a[-1]["content"] == "t2" and t_first.conv_b[-1]["content"] == "s2"
    assert triples[0][1].reference == "r" and s_first.reference is None


def test_cli_help_explains_options(capsys):
    code, out, _ = run_cli(capsys, "evaluate", "--help")
    assert code == 0
    for opt in (
        "--students",
        "--teacher",
        "--sets",
        "--judge",
        "--judge-api-key-env",
        "--tasks",
        "--ppl",
        "--out",
    ):
        assert opt in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sets", "dolly,bogus"], "sets: unknown bogus"),
        (["--tasks", "piqa,mmlu"], "tasks: unknown mmlu"),
        (["--judge", "gpt4"], "--judge"),
        (["--judge", "openai:gpt-4o", "--judge-api-key-env", "NO_SUCH_KEY_VAR"], "NO_SUCH_KEY_VAR"),
        (["--seq-lens", "128,x"], "--seq-lens"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, monkeypatch, tmp_path, args, needle):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    code, _, err = run_cli(
        capsys,
        "evaluate",
        "--students",
        "smollm2-135m-instruct",
        "--teacher",
        "smollm2-135m-instruct",
        "--out",
        str(tmp_path / "o"),
        *args,
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dadpo evaluate: error:") and needle in lines[0]


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [("- 1\n- 2\n", "expected a mapping"), ("evaluate:\n  generation: [1]\n", "generation:")],
)
def test_cli_bad_config_file_is_one_line_exit_2(capsys, tmp_path, yaml_text, needle):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml_text)
    code, _, err = run_cli(capsys, "evaluate", "--students", "s", "--teacher", "t", "--out", str(tmp_path / "o"),
                          "--config", str(cfg), "--max-new-tokens", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_cli_flags_fill_an_empty_config_section(tmp_path):
    from dadpo.cli import build_parser
    from dadpo.evaluate.cli import build_config

    cfg = tmp_path / "recipe.yaml"
    cfg.write_text("evaluate:\n")  # an empty section is no settings, not an error
    args = build_parser().parse_args(["evaluate", "--students", "s", "--teacher", "t", "--out", "o",
                                      "--config", str(cfg), "--max-new-tokens", "8", "--seed", "3"])
    assert EvalConfig.model_validate(build_config(args)).generation.max_new_tokens == 8


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm_dir):
    """Two tiny random-init Llama chat models on disk (SmolLM2's tokenizer): pipeline mechanics in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dadpo.models import load_tokenizer

    tok = load_tokenizer(str(smollm_dir))
    paths = []
    for seed, hidden in ((0, 64), (1, 32)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        path = tmp_path_factory.mktemp(f"tiny{hidden}")
        LlamaForCausalLM(cfg).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    return paths


def test_cli_end_to_end_on_tiny_models_then_rerun_pays_nothing(capsys, data_aliases, tiny_dirs, tmp_path):
    teacher, student = tiny_dirs
    out = tmp_path / "eval"
    corpus = tmp_path / "c.txt"
    corpus.write_text((data_aliases / "wikitext2_raw/test.joined.txt").read_text()[:3000])
    argv = ["evaluate", "--students", f"small={student}", "--teacher", teacher, "--sets", "vicuna_bench,mt_bench",
            "--limit", "2", "--max-new-tokens", "6", "--judge", f"local:{teacher}", "--ppl", str(corpus),
            "--seq-lens", "32", "--out", str(out)]  # fmt: skip
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "small vs teacher on vicuna_bench: preference" in stdout
    res = json.loads((out / "results.json").read_text())
    mt = res["pairwise"]["small"]["mt_bench"]["overall"]
    assert mt["n"] + mt["invalid"] == 4  # 2 questions x 2 turns
    assert res["pairwise"]["small"]["mt_bench"]["calibrated"]["n"] == 4  # the local judge's log-prob reading
    assert res["students"]["small"]["params"] < res["teacher"]["params"]
    assert res["judge"] == f"local:{teacher}" and res["config"]["limit"] == 2
    # both orders of every turn: at most 12 distinct judge prompts (fewer when tiny models answer alike)
    assert 0 < len((out / "verdicts.jsonl").read_text().splitlines()) <= 2 * (2 + 4)
    for name in ["report.md", *res["plots"]]:
        assert (out / name).stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    code, again, _ = run_cli(capsys, *argv)
    assert code == 0 and again == stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == stamps  # nothing generated or judged
    # other decoding settings in the same --out: the cached answers are stale, so they are made again
    code, _, err = run_cli(capsys, *[("4" if a == "6" else a) for a in argv])
    assert code == 0, err
    rows = [json.loads(line) for p in (out / "answers").rglob("*.jsonl") for line in p.read_text().splitlines()]
    assert rows and {r["generation"]["max_new_tokens"] for r in rows} == {4}
    # the judge on one set only: the other set is answered and scored but not judged
    code, _, err = run_cli(capsys, *[("4" if a == "6" else a) for a in argv], "--judge-sets", "mt_bench")
    assert code == 0, err
    assert set(json.loads((out / "results.json").read_text())["pairwise"]["small"]) == {"mt_bench"}


def test_judge_sets_must_be_evaluation_sets():
    with pytest.raises(ValidationError, match=r"judge\.sets: mt_bench not among the evaluation sets"):
        EvalConfig.model_validate({"sets": ["dolly", "mine=x.jsonl"], "judge": {"sets": ["mt_bench"]}})
    assert EvalConfig.model_validate({"sets": ["dolly", "mine=x.jsonl"], "judge": {"sets": ["mine"]}}).judged(
        {"dolly": 1, "mine": 2}) == {"mine": 2}


def test_rouge_over_seeds_caches_each_seed_and_compares_paired(capsys, data_aliases, tiny_dirs, tmp_path):
    teacher, student = tiny_dirs
    out = tmp_path / "eval"
    argv = ["evaluate", "--students", f"small={student}", "--teacher", teacher, "--sets", "dolly", "--limit", "4",
            "--max-new-tokens", "5", "--seeds", "1,2", "--judge", "none", "--bootstrap", "100", "--out", str(out)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    folder = next((out / "answers").glob("small-*"))
    files = {p.name: p.read_text() for p in folder.iterdir()}
    assert sorted(files) == ["dolly.seed1.jsonl", "dolly.seed2.jsonl"]
    one, two = ([json.loads(line)["response"] for line in files[f].splitlines()] for f in sorted(files))
    assert one != two  # another seed, other samples
    rouge = res["students"]["small"]["rouge"]["dolly"]
    assert rouge["seeds"] == 2 and rouge["n"] == 4 and set(rouge["per_seed"]) == {"1", "2"}
    assert rouge["mean"] == pytest.approx(sum(rouge["per_seed"].values()) / 2)
    [c] = res["comparisons"]  # the teacher against the baseline, the first student
    assert (c["set"], c["a"], c["b"], c["n"]) == ("dolly", "teacher", "small", 4)
    teacher_prompts = res["teacher"]["rouge"]["dolly"]["prompts"]
    assert c["delta"] == pytest.approx(sum(teacher_prompts[i] - rouge["prompts"][i] for i in rouge["prompts"]) / 4)
    diag = res["students"]["small"]["diagnostics"]["dolly"]
    assert diag["answers"] == 8 and diag["mean_tokens"] <= 5
    report = (out / "report.md").read_text()
    assert "### dolly (4 prompts × 2 seeds)" in report and "Answer diagnostics" in report
    assert "rouge.png" in res["plots"]
    # the same seed again gives the same samples (served from the cache, byte for byte); a new seed is added
    code, _, err = run_cli(capsys, *[("1,3" if a == "1,2" else a) for a in argv])
    assert code == 0, err
    assert (folder / "dolly.seed1.jsonl").read_text() == files["dolly.seed1.jsonl"]
    assert (folder / "dolly.seed3.jsonl").is_file()
    (folder / "dolly.seed1.jsonl").unlink()  # made again from scratch: the same samples
    assert run_cli(capsys, *[("1,3" if a == "1,2" else a) for a in argv])[0] == 0
    assert (folder / "dolly.seed1.jsonl").read_text() == files["dolly.seed1.jsonl"]


@pytest.mark.slow
def test_run_evaluate_end_to_end_then_rerun_pays_nothing(data_aliases, smollm_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text((data_aliases / "wikitext2_raw/test.joined.txt").read_text()[:6000])
    cfg = EvalConfig.model_validate(
        {
            "sets": ["vicuna_bench", "dolly"],
            "limit": 2,
            "generation": {"max_new_tokens": 12, "batch_size": 2},
            "judge": {"kind": "local", "model": "smollm2-135m-instruct", "batch_size": 4},
            "ppl_corpora": [str(corpus)],
            "seq_lens": [64],
            "ppl_window_stride": 2,
            "bootstrap": 200,
        }
    )
    out = tmp_path / "eval"
    res = run_evaluate({"same": "smollm2-135m-instruct"}, "smollm2-135m-instruct", out, cfg, progress=False)
    vic = res["pairwise"]["same"]["vicuna_bench"]["overall"]
    # the student is the teacher: identical greedy answers, so a consistent judge can only say tie
    assert vic["n"] + vic["invalid"] == 2 and vic["loss"]["value"] == vic["win"]["value"] == 0
    assert vic["preference"]["value"] == 0
    ppl = res["teacher"]["perplexity"][0]
    assert res["teacher"]["params"] > 1e8 and ppl["seq_len"] == 64 and ppl["window_stride"] == 2
    assert "dolly" in res["teacher"]["rouge"]
    # no zero-shot tasks: size vs quality plots the adjusted win rate, unless the judge failed its validity check
    judged = res["pairwise"]["same"]["vicuna_bench"]["validity"]["valid"] is not False
    assert "winrate.png" in res["plots"] and ("params_vs_score.png" in res["plots"]) == judged
    for name in ["results.json", "report.md", *res["plots"]]:
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["judge"] == "local:smollm2-135m-instruct"
    report = (out / "report.md").read_text()
    assert "preference" in report and "flip" in report and "ROUGE-L" in report
    assert f"| {ppl['windows']} (1 in 2) |" in report
    verdicts = (out / "verdicts.jsonl").read_text()
    assert len(verdicts.splitlines()) == 4  # identical answers in both orders: 2 distinct prompts per set
    # rerun: answers, metrics and verdicts all come from the cache
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")}
    again = run_evaluate({"same": "smollm2-135m-instruct"}, "smollm2-135m-instruct", out, cfg, progress=False)
    assert again["pairwise"] == res["pairwise"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl")} == stamps


def test_seed_caches_copies_only_matching_finished_work(tmp_path):
    """A sibling run's answers/metrics/verdicts of the same spec and settings are copied; others are not."""
    from dadpo.evaluate.answers import answer_config, model_slug
    from dadpo.evaluate.run import seed_caches
    from dadpo.io import append_jsonl, atomic_write_json

    cfg = EvalConfig(sets=["vicuna_bench"])
    other, ours = tmp_path / "run" / "evaluate", tmp_path / "bench" / "evaluate"
    stamp = {"model": "/m/pruned", "generation": answer_config(cfg).model_dump()}
    folder = other / "answers" / model_slug("pruned", "/m/pruned")
    folder.mkdir(parents=True)
    ours.mkdir(parents=True)
    append_jsonl(folder / "vicuna_bench.jsonl", [{"id": "1", "response": "hi", **stamp}])
    append_jsonl(folder / "mt_bench.jsonl", [{"id": "1", **stamp, "generation": {"max_new_tokens": 1}}])
    append_jsonl(folder / "dolly.jsonl.part", [{"id": "1", **stamp}])  # unfinished: never taken
    atomic_write_json(other / "metrics" / f"{model_slug('pruned', '/m/pruned')}.json", {"key": "k", "metrics": {}})
    atomic_write_json(other / "metrics" / f"{model_slug('x', '/m/other')}.json", {"key": "k", "metrics": {}})
    append_jsonl(other / "verdicts.jsonl", [{"key": "a", "verdict": "A"}, {"key": "b", "verdict": None}])
    append_jsonl(ours / "verdicts.jsonl", [{"key": "a", "verdict": "A"}])

    seed_caches(ours, [other, tmp_path / "missing"], {"none": "/m/pruned"}, cfg)
    mine = ours / "answers" / model_slug("none", "/m/pruned")
    assert sorted(p.name for p in mine.iterdir()) == ["vicuna_bench.jsonl"]
    assert [p.name for p in (ours / "metrics").iterdir()] == [f"{model_slug('none', '/m/pruned')}.json"]
    assert [json.loads(line)["key"] for line in (ours / "verdicts.jsonl").open()] == ["a", "b"]


def test_ptb_is_joined_like_the_hubs_stripped_rows(data_dir, tmp_path):
    from dadpo.perplexity import load_corpus

    text = load_corpus("ptb", data_dir)
    assert text.startswith("no it was n't black monday but while the new york stock exchange")
    assert "  " not in text and text == text.strip()  # the file pads every line with spaces
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DadpoError, match="latin1.txt: not UTF-8"):
        load_corpus(str(bad))


def test_perplexity_windows_prefix_and_stride(smollm):
    """GPTQ protocol by hand: non-overlapping windows of one tokenization; stride k takes every k-th window."""
    import math

    import torch

    from dadpo.perplexity import perplexity

    model, tok = smollm
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids[: (ids.numel() // 16) * 16].view(-1, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none").sum(1)
    every_other = perplexity(model, tok, text, seq_len=16, window_stride=2, max_windows=3, progress=False)
    assert every_other["windows"] == 3 and every_other["tokens"] == 3 * 15
    assert every_other["ppl"] == pytest.approx(math.exp(nll[[0, 2, 4]].sum().item() / 45), rel=1e-3)  # batching noise
    prefix = perplexity(model, tok, text, seq_len=16, max_windows=2, batch_size=1, progress=False)
    assert prefix["ppl"] == pytest.approx(math.exp(nll[:2].sum().item() / 30), rel=1e-3)
    # the CI resamples windows: it lies between the best and the worst single window's perplexity
    lo, hi = prefix["ppl_ci95"]
    best, worst = (math.exp(v / 15) for v in (nll[:2].min().item(), nll[:2].max().item()))
    assert best * (1 - 1e-3) <= lo <= prefix["ppl"] <= hi <= worst * (1 + 1e-3)


#: boolq acc 50 (SE 5), hellaswag acc_norm 40 (SE 10), piqa acc 64 (SE 4.8); mmlu (not LLM-Pruner's) and an
#: arc_challenge without its acc_norm are left out
ZEROSHOT = {"boolq": {"acc": 0.5, "n": 100}, "hellaswag": {"acc": 0.3, "acc_norm": 0.4, "n": 24},
            "piqa": {"acc": 0.64, "acc_norm": 0.655, "n": 100}, "mmlu": {"acc": 0.9, "n": 10},
            "arc_challenge": {"acc": 0.2, "n": 5}}


def test_zeroshot_summary_by_hand():
    """LLM-Pruner's metric per task, binomial SE sqrt(p(1−p)/n), pooled SE of the mean sqrt(Σ SE²)/T."""
    from dadpo.evaluate.zeroshot import zeroshot_summary

    s = zeroshot_summary(ZEROSHOT)
    assert list(s["tasks"]) == ["boolq", "hellaswag", "piqa"]
    assert s["tasks"]["hellaswag"] == {"metric": "acc_norm", "value": pytest.approx(40.0), "se": pytest.approx(10.0),
                                       "n": 24}
    assert [t["se"] for t in s["tasks"].values()] == pytest.approx([5.0, 10.0, 4.8])
    assert s["mean"] == pytest.approx((50 + 40 + 64) / 3)
    assert s["se"] == pytest.approx((5.0**2 + 10.0**2 + 4.8**2) ** 0.5 / 3)
    no_n = zeroshot_summary({"boolq": {"acc": 0.6}, "piqa": {"acc": 0.5, "n": 4}})  # n unknown: no SE to claim
    assert no_n["tasks"]["boolq"]["se"] is None and no_n["se"] is None and no_n["mean"] == pytest.approx(55.0)
    assert zeroshot_summary({}) == {"mean": None, "se": None, "tasks": {}}


def test_report_shows_each_zero_shot_score_with_its_95_interval():
    """report.md's cells: LLM-Pruner's metric ± 1.96 SE, the mean ± its pooled interval; the heading names the
    metric per task. Without n (no SE) the value stands alone; acc-only tasks (boolq) need no acc_norm."""
    from dadpo.evaluate.report import render_markdown

    teacher = {"spec": "t", "params": 134_515_008, "zeroshot": ZEROSHOT}
    student = {"spec": "s", "params": 107_558_208, "zeroshot": {"boolq": {"acc": 0.6}}}
    md = render_markdown({"teacher": teacher, "students": {"s": student}, "pairwise": {}, "judge": None})
    assert "boolq acc, hellaswag acc_norm, piqa acc)" in md and "95% interval" in md
    assert "| boolq acc (n=100) | hellaswag acc_norm (n=24) | piqa acc (n=100) | mean |" in md
    assert "| teacher | 134.5 | 50.0 ± 9.8 | 40.0 ± 19.6 | 64.0 ± 9.4 | 51.3 ± 7.9 |" in md
    assert "| s | 107.6 | 60.0 | – | – | 60.0 |" in md


def test_plots_show_zero_shot_intervals(tmp_path):
    """Both plots are drawn from the summary (with intervals); without zero-shot SEs the size plot falls back
    to the adjusted win rate with its CI, and a student without a CI is not plotted."""
    from dadpo.evaluate.report import _params_score, write_plots

    teacher = {"spec": "t", "params": 134_515_008, "zeroshot": ZEROSHOT}
    res = {"teacher": teacher, "students": {"s": {**teacher, "params": 107_558_208}}, "pairwise": {}}
    assert write_plots(res, tmp_path) == ["zeroshot.png", "params_vs_score.png"]
    label, points, reference = _params_score(res)
    mean, half = 154 / 3, 1.96 * (5.0**2 + 10.0**2 + 4.8**2) ** 0.5 / 3
    assert reference is None and points[0][2:] == (pytest.approx(mean), pytest.approx((mean - half, mean + half)))
    win = {"value": 60.0, "ci95": [45.0, 75.0]}
    res = {"teacher": {"params": 2}, "students": {"s": {"params": 1}, "u": {"params": 1}},
           "pairwise": {"s": {"vicuna_bench": {"overall": {"adjusted_win": win}}},
                        "u": {"vicuna_bench": {"overall": {"adjusted_win": {"value": None, "ci95": None}}}}}}
    label, points, reference = _params_score(res)
    assert points == [("s", 1, 60.0, (45.0, 75.0))] and reference[1] == 50.0
