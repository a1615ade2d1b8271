"""Judge prompt, verdict parsing, two-order statistics, and both judge backends on real models over real HTTP."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dadpo.errors import DadpoError
from dadpo.evaluate.backends import LocalJudge, OpenAIJudge
from dadpo.evaluate.judge import PairItem, VerdictCache, judge_messages, parse_verdict
from dadpo.evaluate.stats import (
    calibrated_margin,
    combine,
    invalid_label,
    judge_validity,
    pairwise_summary,
    pool_validity,
    summarize,
)


def _item(key: str, q: str, a: str, b: str) -> PairItem:
    user = {"role": "user", "content": q}
    return PairItem(key, [user, {"role": "assistant", "content": a}], [user, {"role": "assistant", "content": b}])


ITEMS = [
    _item("capital", "What is the capital of France?", "The capital of France is Paris.", "Bananas are yellow."),
    _item("math", "What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
]


@pytest.mark.parametrize(("reply", "verdict"), [
    ("A is better. [[A]]", "A"), ("[[B]]", "B"), ("tie: [[ C ]]", "C"), ("first [[A]] then final [[B]]", "B"),
    ("I prefer A", None), ("[A]", None), ("", None), ("[[D]]", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_prompt_names_both_answers_and_asks_for_verdict_tokens():
    msgs = judge_messages(ITEMS[0])
    assert msgs[0]["role"] == "system" and "[[A]]" in msgs[0]["content"] and "[[C]]" in msgs[0]["content"]
    assert "order" in msgs[0]["content"] and "longer" in msgs[0]["content"]  # position and length bias
    user = msgs[1]["content"]
    assert user.index("Paris") < user.index("Bananas")
    swapped = judge_messages(PairItem("x", ITEMS[0].conv_b, ITEMS[0].conv_a))[1]["content"]
    assert swapped.index("Bananas") < swapped.index("Paris")


def test_multi_turn_prompt_shows_each_assistants_own_conversation():
    u1, u2 = {"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}
    conv_a = [u1, {"role": "assistant", "content": "a1"}, u2, {"role": "assistant", "content": "a2"}]
    conv_b = [u1, {"role": "assistant", "content": "b1"}, u2, {"role": "assistant", "content": "b2"}]
    text = judge_messages(PairItem("k", conv_a, conv_b, reference="ref"))[1]["content"]
    assert "LAST" in text and "ref" in text
    assert text.index("a1") < text.index("a2") < text.index("b1") < text.index("b2")


def test_combine_order_dependent_verdict_is_a_tie_and_a_flip():
    assert combine("A", "B") == {"outcome": 1, "flip": False}  # student first wins, teacher first loses
    assert combine("B", "A") == {"outcome": -1, "flip": False}
    assert combine("C", "C") == {"outcome": 0, "flip": False}
    assert combine("A", "A") == {"outcome": 0, "flip": True}  # the judge always picks position A
    assert combine("A", "C") == {"outcome": 0, "flip": True}
    assert combine(None, "A")["outcome"] is None


def test_calibrated_margin_cancels_position_bias():
    # a judge pulled 2 nats towards position A that still sees the student 0.5 nats better
    student_first = {"A": -1.0, "B": -3.5, "C": -4.0}  # margin +2.5 = bias 2 + 0.5
    teacher_first = {"A": -1.0, "B": -2.5, "C": -4.0}  # margin +1.5 = bias 2 - 0.5
    assert calibrated_margin(student_first, teacher_first) == pytest.approx(0.5)
    assert calibrated_margin(teacher_first, student_first) == pytest.approx(-0.5)
    assert calibrated_margin(student_first, student_first) == 0  # identical answers: no preference


def test_summary_rates_and_ci():
    s = summarize([1] * 6 + [0] * 2 + [-1] * 2, flips=2, invalid=1, samples=2000, seed=0)
    assert s["n"] == 10 and s["invalid"] == 1 and s["flip_rate"] == 20
    assert s["win"]["value"] == 60 and s["tie"]["value"] == 20 and s["loss"]["value"] == 20
    assert s["preference"]["value"] == pytest.approx(40) and s["adjusted_win"]["value"] == pytest.approx(70)
    lo, hi = s["preference"]["ci95"]
    assert lo < 40 < hi and lo > -100 and hi <= 100
    same = summarize([0] * 20, flips=20, invalid=0, samples=500)
    assert same["preference"]["ci95"] == [0.0, 0.0]


def test_pairwise_summary_per_category_and_invalid():
    pairs = [{"category": "a", **combine("A", "B")}, {"category": "a", **combine("B", "A")},
             {"category": "b", **combine(None, "B")}, {"category": "b", **combine("A", "A")}]
    s = pairwise_summary(pairs, samples=100)
    assert s["overall"]["n"] == 3 and s["overall"]["invalid"] == 1
    assert s["categories"]["a"]["preference"]["value"] == 0 and s["categories"]["b"]["flip_rate"] == 100


def test_local_judge_reads_logprobs_and_caches(smollm, tmp_path):
    model, tok = smollm
    cache = VerdictCache(tmp_path / "v.jsonl")
    judge = LocalJudge(model, tok, "smollm2-135m-instruct", batch_size=2)
    rows = judge.judge(ITEMS, cache, progress=False)
    assert [r["item"] for r in rows] == ["capital", "math"]
    for r in rows:
        assert r["verdict"] in ("A", "B", "C")
        assert r["verdict"] == max(r["logprobs"], key=r["logprobs"].get)
        assert all(lp < 0 for lp in r["logprobs"].values())
    # a second judge over the same file pays nothing: it never touches its model
    judge.model = None
    again = LocalJudge.judge(judge, ITEMS, VerdictCache(tmp_path / "v.jsonl"), progress=False)
    assert [r["verdict"] for r in again] == [r["verdict"] for r in rows]
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_local_judge_is_deterministic_in_batches(smollm, tmp_path):
    model, tok = smollm
    one = LocalJudge(model, tok, "m", batch_size=1).judge(ITEMS, VerdictCache(tmp_path / "1.jsonl"), False)
    two = LocalJudge(model, tok, "m", batch_size=2).judge(ITEMS, VerdictCache(tmp_path / "2.jsonl"), False)
    for a, b in zip(one, two, strict=True):
        assert a["verdict"] == b["verdict"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=2e-3)  # left padding does not change it


@pytest.fixture
def server(smollm):
    """A real OpenAI-compatible server backed by SmolLM2, on a free port of 127.0.0.1."""
    from dadpo.evaluate.serve import make_server

    model, tok = smollm
    srv = make_server(model, tok, "smollm", max_tokens_cap=24)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}/v1", srv
    srv.shutdown()
    srv.server_close()


def test_openai_judge_over_http_counts_unparsable_replies_invalid(server, tmp_path):
    url, _ = server
    judge = OpenAIJudge(url, "smollm", api_key_env=None, concurrency=2, retries=0, max_tokens=24)
    rows = judge.judge(ITEMS, VerdictCache(tmp_path / "v.jsonl"), progress=False)
    assert [r["item"] for r in rows] == ["capital", "math"]
    for r in rows:
        assert isinstance(r["reply"], str) and r["reply"]  # a real generated reply came back over HTTP
        assert r["verdict"] == parse_verdict(r["reply"])  # None (invalid) unless it wrote [[X]]
    summary = pairwise_summary([{"category": "x", **combine(rows[0]["verdict"], rows[1]["verdict"])}])
    assert summary["overall"]["n"] + summary["overall"]["invalid"] == 1


def test_replies_cut_off_by_max_tokens_are_asked_again_with_a_larger_cap(server, tmp_path, monkeypatch):
    url, srv = server
    handler, posts = srv.RequestHandlerClass, []
    answer = handler.do_POST
    monkeypatch.setattr(handler, "do_POST", lambda self: (posts.append(self.path), answer(self)))
    cache = VerdictCache(tmp_path / "v.jsonl")

    def judge(max_tokens: int) -> list[dict]:
        posts.clear()
        return OpenAIJudge(url, "smollm", api_key_env=None, retries=0, max_tokens=max_tokens).judge(
            ITEMS, cache, progress=False)

    assert all(r["verdict"] is None for r in judge(1))  # one token cannot hold "[[A]]": all invalid
    assert len(posts) == 2
    judge(1)
    assert posts == []  # the same cap gives the same reply: served from the cache
    rows = judge(24)
    assert len(posts) == 2 and all(r["max_tokens"] == 24 for r in rows)
    judge(8)
    assert posts == []  # a smaller cap never redoes a reply written under a larger one


def test_openai_judge_sends_the_api_key(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    judge = OpenAIJudge(url, "smollm", api_key_env="MY_JUDGE_KEY", retries=0, max_tokens=8)
    assert judge.api_key == "sk-test"
    assert len(judge.judge(ITEMS[:1], VerdictCache(tmp_path / "v.jsonl"), progress=False)) == 1


def test_missing_api_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(DadpoError, match="NO_SUCH_JUDGE_KEY"):
        OpenAIJudge("http://127.0.0.1:1/v1", "gpt", api_key_env="NO_SUCH_JUDGE_KEY")


def test_unreachable_endpoint_errors_after_retries_and_keeps_cached_verdicts(server, tmp_path):
    url, srv = server
    cache_path = tmp_path / "v.jsonl"
    OpenAIJudge(url, "smollm", api_key_env=None, retries=0, max_tokens=8).judge(
        ITEMS[:1], VerdictCache(cache_path), progress=False)
    srv.shutdown()
    srv.server_close()
    dead = OpenAIJudge(url, "smollm", api_key_env=None, retries=2, backoff=0.01, timeout=2, max_tokens=8)
    with pytest.raises(DadpoError, match=r"unreachable after 3 tries"):
        dead.judge(ITEMS, VerdictCache(cache_path), progress=False)
    kept = VerdictCache(cache_path)
    assert len(kept.rows) == 1  # the verdict paid for before the outage is still there
    # and is served from the cache although the endpoint is still down
    assert dead.judge(ITEMS[:1], kept, progress=False)[0]["key"] in kept.rows


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal: a process started in the background by a shell
    without job control inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is not None:  # None: installed outside Python, cannot be put back from here
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_cancels_queued_requests_and_keeps_the_one_in_flight(server, tmp_path, monkeypatch):
    url, srv = server
    handler, posts = srv.RequestHandlerClass, []
    answer = handler.do_POST

    def press_ctrl_c_during_the_first_request(self):
        posts.append(self.path)
        if len(posts) == 1:  # the judge is waiting on this request; Ctrl-C lands before it is answered
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
        answer(self)

    monkeypatch.setattr(handler, "do_POST", press_ctrl_c_during_the_first_request)
    items = [_item(f"q{i}", f"What is {i} + {i}?", f"{2 * i}.", f"{2 * i + 1}.") for i in range(6)]
    path = tmp_path / "v.jsonl"
    judge = OpenAIJudge(url, "smollm", api_key_env=None, concurrency=1, retries=0, max_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        judge.judge(items, VerdictCache(path), progress=False)
    assert 1 <= len(posts) <= 2  # of 12 paid requests, those still queued were never sent
    assert len(VerdictCache(path).rows) == len(posts)  # and every one that was sent is kept


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_while_the_workers_are_still_starting_keeps_the_request_in_flight(server, tmp_path, monkeypatch):
    """The interrupt lands right after the first worker started (and sent its request), before the judge
    could note that worker anywhere: the judge must still wait for that reply and keep it."""
    url, srv = server
    handler, posts, first_post = srv.RequestHandlerClass, [], threading.Event()
    answer, start = handler.do_POST, threading.Thread.start

    def press_ctrl_c_during_the_first_request(self):
        posts.append(self.path)
        if len(posts) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            first_post.set()
            time.sleep(0.5)
        answer(self)

    def start_then_wait_for_the_first_request(thread):
        start(thread)
        if thread.name.startswith(("judge", "ThreadPoolExecutor")) and first_post.wait(10):
            time.sleep(0.05)  # the interrupt is raised here, in the main thread

    monkeypatch.setattr(handler, "do_POST", press_ctrl_c_during_the_first_request)
    monkeypatch.setattr(threading.Thread, "start", start_then_wait_for_the_first_request)
    items = [_item(f"q{i}", f"What is {i} + {i}?", f"{2 * i}.", f"{2 * i + 1}.") for i in range(2)]
    path = tmp_path / "v.jsonl"
    judge = OpenAIJudge(url, "smollm", api_key_env=None, concurrency=2, retries=0, max_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        judge.judge(items, VerdictCache(path), progress=False)
    assert len(posts) == 1  # the second worker never started, so nothing else was sent
    assert len(VerdictCache(path).rows) == 1  # and the reply to the request in flight is kept


def test_a_garbled_http_reply_is_retried_then_a_clear_error():
    import socketserver

    class Garbage(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"not an HTTP status line\r\n\r\n")  # http.client: BadStatusLine

    with socketserver.TCPServer(("127.0.0.1", 0), Garbage) as srv:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        judge = OpenAIJudge(url, "m", api_key_env=None, retries=1, backoff=0.01)
        with pytest.raises(DadpoError, match=r"unreachable after 2 tries: .*not an HTTP status line"):
            judge._post([{"role": "user", "content": "hi"}])
        srv.shutdown()


def test_verdict_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "v.jsonl"
    VerdictCache(path).add([{"key": "a", "verdict": "A"}])
    with open(path, "a") as f:
        f.write('{"key": "b", "verd')
    cache = VerdictCache(path)
    assert set(cache.rows) == {"a"}
    cache.add([{"key": "c", "verdict": "C"}])
    assert set(VerdictCache(path).rows) == {"a", "c"}


# --- judge validity: a judge whose verdicts do not depend on the answers is reported as invalid ---------------


def _flips(k: int) -> list[tuple[str, str]]:
    """100 pairs: k flip (always [[A]]), the rest keep their verdict across orders, student wins and losses
    alternating, so no letter reaches 90% of an order."""
    rest = [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(100 - k)]
    return [("A", "A")] * k + rest


def _ties(k: int) -> list[tuple[str, str]]:
    """100 pairs, none flipping: k consistent ties, the rest consistent wins and losses."""
    return [("C", "C")] * k + [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(100 - k)]


def test_validity_flip_rate_limit_is_50_percent():
    ok = judge_validity(_flips(49))
    assert ok["valid"] is True and ok["reason"] is None and ok["flip_rate"] == 49
    assert max(ok["letter_share"]["student_first"].values()) < 90 and invalid_label(ok) is None
    bad = judge_validity(_flips(50))
    assert bad["valid"] is False and bad["reason"] == "flip rate 50%"
    assert invalid_label(bad) == "judge invalid (flip rate 50%)"


def test_validity_letter_share_limit_is_90_percent_in_one_order():
    ok = judge_validity(_ties(89))
    assert ok["valid"] is True and ok["flip_rate"] == 0 and ok["letter_share"]["student_first"]["C"] == 89
    bad = judge_validity(_ties(90))  # a judge that calls nearly everything a tie never flips, yet does not judge
    assert bad["valid"] is False and bad["flip_rate"] == 0
    assert bad["reason"] == "[[C]] for 90% of prompts with the student shown first"
    # one order alone is enough: the teacher-first verdicts are [[A]] 90% of the time, the student-first ones vary
    one_order = [("B", "A")] * 45 + [("C", "A")] * 45 + [("A", "B")] * 10
    v = judge_validity(one_order)
    assert v["reason"] == "[[A]] for 90% of prompts with the teacher shown first" and v["flip_rate"] == 45
    assert v["letter_share"]["teacher_first"] == {"A": 90, "B": 10, "C": 0}


def test_validity_a_consistent_winner_is_content_not_position():
    # a student that loses every question: [[B]] with it first, [[A]] with the teacher first — a judge that
    # follows an answer across the swap, however lopsided the letters of each order
    assert judge_validity([("B", "A")] * 30)["valid"] is True
    assert judge_validity([("A", "B")] * 19 + [("C", "B")])["valid"] is True
    # always [[A]]: both rules fire, and the reason names both
    v = judge_validity([("A", "A")] * 20)
    assert v["reason"] == "flip rate 100%; [[A]] for 100% of prompts with the student shown first"


def test_validity_identical_answers_and_missing_verdicts():
    # identical answers: a tie is the right verdict, not a sign of blindness; a flip there is still position bias
    assert judge_validity([("C", "C")] * 10, identical=[True] * 10)["valid"] is True
    assert judge_validity([("C", "C")] * 10)["valid"] is False
    assert judge_validity([("A", "A")] * 10, identical=[True] * 10)["reason"] == "flip rate 100%"
    nothing = judge_validity([(None, None)] * 3)  # no verdict at all: nothing to decide from
    assert nothing["valid"] is None and nothing["flip_rate"] is None and invalid_label(nothing) is None
    assert judge_validity([(None, "B"), ("A", "B"), ("B", "A")])["flip_rate"] == 0  # over pairs with both


def test_pooled_validity_decides_on_the_summed_counts():
    steady, flipping = judge_validity(_flips(0)[:10]), judge_validity([("A", "A")] * 10)
    pooled = pool_validity([steady, flipping])
    assert pooled["flip_rate"] == 50 and pooled["valid"] is False
    assert pool_validity([steady, steady])["valid"] is True
    assert pool_validity([None, None]) is None  # results written before validity existed: no flag


def _qa_rows(answers: list[tuple[str, str]]) -> list[dict]:
    """Answer rows as `generate_answers` writes them (one turn each), from (question, answer) pairs."""
    return [
        {"id": str(k), "category": "qa", "responses": [a],
         "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for k, (q, a) in enumerate(answers)
    ]


#: (question, right answer, wrong answer)
QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "Bananas are yellow."),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
    ("Repeat exactly: blue whale", "blue whale", "I like trains."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have three legs."),
]


def _results(pairwise: dict, judge: str) -> dict:
    block = {"spec": "m", "params": 134_515_008}
    return {"teacher": block, "students": {s: block for s in pairwise}, "pairwise": pairwise, "judge": judge,
            "config": {}}


def test_the_local_135m_judge_is_flagged_invalid_and_reports_print_the_flag(smollm, tmp_path):
    """The real SmolLM2-135M judge on real pairs (the student right on half, wrong on the other half)."""
    from dadpo.bench import bench_rows, markdown_table
    from dadpo.evaluate.config import EvalConfig
    from dadpo.evaluate.report import render_markdown
    from dadpo.evaluate.run import judge_student

    model, tok = smollm
    student = _qa_rows([(q, good if k % 2 == 0 else bad) for k, (q, good, bad) in enumerate(QA)])
    teacher = _qa_rows([(q, bad if k % 2 == 0 else good) for k, (q, good, bad) in enumerate(QA)])
    judge = LocalJudge(model, tok, "smollm2-135m-instruct", batch_size=4)
    summary = judge_student(judge, VerdictCache(tmp_path / "v.jsonl"), {"qa": student}, {"qa": teacher},
                            EvalConfig.model_validate({"bootstrap": 100}), progress=False)["qa"]
    v = summary["validity"]
    # measured: [[A]] for every prompt in both orders, so every pair flips
    assert v["valid"] is False and v["flip_rate"] >= 50
    assert v["reason"].startswith("flip rate") and v["flip_rate"] == summary["overall"]["flip_rate"]
    assert summary["overall"]["preference"]["value"] is not None  # the numbers stay in results.json, flagged

    md = render_markdown(_results({"pruned": {"qa": summary}}, judge.id))
    flag = invalid_label(v)
    assert f"| pruned | qa | 4 | – | – | – | {flag} | – |" in md
    assert f"| {flag} |" in md.split("mean margin")[1]  # the calibrated reading is kept, labelled
    table = markdown_table(bench_rows(_results({"pruned": {"qa": summary}}, judge.id)))
    assert f"| pruned | 134.5 | {flag} |" in table and "†" in table


def _rule_judge_server():
    """A real OpenAI-compatible HTTP judge that decides by content: it reads both replies and the reference
    out of dadpo's judge prompt and prefers the reply that contains the reference ([[C]] when both or neither
    do). Its intelligence is not under test; dadpo's HTTP client and validity check are."""
    import json
    import re
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def section(text: str, name: str) -> str:
        m = re.search(rf"\[{name}\]\n(.*?)\n\[End of {name.lower()}\]", text, re.S | re.I)
        return m.group(1) if m else ""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            ref = section(prompt, "Reference answer").lower()
            a, b = (ref in section(prompt, f"Reply of assistant {x}").lower() for x in "AB")
            verdict = "A" if a and not b else "B" if b and not a else "C"
            out = json.dumps({"choices": [{"message": {"role": "assistant",
                                                       "content": f"Compared with the reference: [[{verdict}]]"}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out.encode())

        def log_message(self, *args):
            pass

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


def test_a_judge_that_reads_the_answers_is_not_flagged(tmp_path):
    from dadpo.bench import bench_rows, markdown_table
    from dadpo.evaluate.config import EvalConfig
    from dadpo.evaluate.report import render_markdown
    from dadpo.evaluate.run import judge_student

    right = [(q, good) for q, good, _ in QA]
    wrong = [(q, bad) for q, _, bad in QA]
    mixed_s = _qa_rows([right[k] if k % 2 == 0 else wrong[k] for k in range(len(QA))])
    mixed_t = _qa_rows([wrong[k] if k % 2 == 0 else right[k] for k in range(len(QA))])
    always_s, always_t = _qa_rows(right), _qa_rows(wrong)
    for rows in (mixed_s, always_s):  # the judge prompt takes the reference from the student's rows
        for r, (_, good, _) in zip(rows, QA, strict=True):
            r["reference"] = good
    srv = _rule_judge_server()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        judge = OpenAIJudge(f"http://127.0.0.1:{srv.server_port}/v1", "rule", api_key_env=None, retries=0)
        out = judge_student(judge, VerdictCache(tmp_path / "v.jsonl"),
                            {"mixed": mixed_s, "always_right": always_s}, {"mixed": mixed_t, "always_right": always_t},
                            EvalConfig.model_validate({"bootstrap": 100}), progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    for s in ("mixed", "always_right"):
        v = out[s]["validity"]
        assert v["valid"] is True and v["reason"] is None and v["flip_rate"] == 0, (s, v)
    assert out["mixed"]["overall"]["preference"]["value"] == 0  # 2 wins, 2 losses
    # the student right every time: [[A]] for all student-first prompts, [[B]] for all teacher-first ones
    assert out["always_right"]["validity"]["letter_share"]["student_first"]["A"] == 100
    assert out["always_right"]["overall"]["preference"]["value"] == 100
    md = render_markdown(_results({"recovered": out}, judge.id))
    assert "judge invalid (" not in md and "| recovered | always_right | 4 | 100.0" in md
    table = markdown_table(bench_rows(_results({"recovered": out}, judge.id)))
    assert "judge invalid" not in table and "| recovered | 134.5 | 50.0 |" in table  # pooled: (0·4 + 100·4) / 8
