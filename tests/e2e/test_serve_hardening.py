"""``ponder serve`` as outside testing tried it (issue 24): closed streams, values that
were 500s, limits a strategy could bypass, streamed logprobs, prompts too long for
their ``max_tokens``, HTTP edges (content types, image parts, 404/405 bodies,
``best_of``, ``suffix``, ``include_usage``, ``/v1/models/{id}``), shutdown and
``/metrics``. Each test failed before its fix. A real server on loopback throughout."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from servers import ponder_serve

pytestmark = pytest.mark.slow

Q = "Q: 3+4-2+8-1\n"


@pytest.fixture(scope="module")
def srv():
    s = ponder_serve("--reward-model", "arith-reward", "--max-n", "8")
    yield s
    s.stop()


def _root(s) -> str:
    return f"http://127.0.0.1:{s.port}"


def _events(s, body: dict) -> list[dict]:
    out = []
    with httpx.stream("POST", s.url + "/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_a_closed_stream_withdraws_its_rows_every_time(srv):
    """Closing an n=8 stream after 3 chunks frees its rows at once, in every round
    (it was a race: 9 rounds of 10 left rows running to max_tokens)."""
    body = {"prompt": "Q: 1+1\n", "max_tokens": 400, "temperature": 1.0, "ignore_eos": True, "n": 8, "stream": True}
    waits = []
    for _ in range(10):
        with httpx.stream("POST", srv.url + "/completions", json=body, timeout=60) as s:
            for i, _line in enumerate(s.iter_lines()):
                if i >= 5:  # three events and their blank lines
                    break
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            h = httpx.get(_root(srv) + "/health").json()
            if h["engine"]["running"] == 0 and h["inflight"] == 0:
                break
            time.sleep(0.02)
        waits.append(time.monotonic() - t0)
        assert h["engine"]["running"] == 0 and h["inflight"] == 0, (waits, h)
    assert max(waits) < 1.0, waits


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bias", [{"99999": 1}, {"12345678901234567890123": -100}, {"-1": 5}])
def test_logit_bias_outside_the_vocabulary_is_a_400(srv, bias, stream):
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "logit_bias": bias, "stream": stream})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias" and "vocab" not in r.text.lower() or "[0," in r.text


def test_a_lone_surrogate_in_the_prompt_is_a_400(srv):
    r = httpx.post(srv.url + "/completions", content=b'{"prompt": "Q: \\ud800 1+1\\n"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "Unicode" in r.json()["error"]["message"], r.text


def test_deeply_nested_json_is_a_400(srv):
    for body in (b"[" * 10_000 + b"]" * 10_000, b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"):
        r = httpx.post(srv.url + "/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("settings", [{"samples": 48}, {}, {"samples": 4}])
def test_limits_hold_for_what_a_strategy_spends(srv, settings):
    """--max-n 8: a strategy may not spend more generations than that, whether asked for
    by its settings or by its defaults (majority draws 16 by default), or times n."""
    body = {"prompt": Q, "max_tokens": 48, "temperature": 0.7, "ponder": {"strategy": "majority", "settings": settings}}
    r = httpx.post(srv.url + "/completions", json=body, timeout=60)
    if settings.get("samples") == 4:
        assert r.status_code == 200, r.text
        r = httpx.post(srv.url + "/completions", json={**body, "n": 3}, timeout=60)  # 3 x 4 = 12 > 8
    assert r.status_code == 400 and "--max-n" in r.json()["error"]["message"], r.text
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "max_tokens": 8, "ponder": {
        "strategy": "mcts", "settings": {"iterations": 500}}}, timeout=60)
    assert r.status_code == 400 and "iterations" in r.json()["error"]["message"], r.text


def test_streamed_logprobs_spell_the_text(srv):
    evs = _events(srv, {"prompt": Q, "max_tokens": 40, "logprobs": 2, "temperature": 0})
    choices = [c for e in evs for c in e.get("choices", [])]
    text = "".join(c["text"] for c in choices)
    lps = [c["logprobs"] for c in choices if c["logprobs"] is not None]
    assert lps, "no logprobs streamed"
    tokens = [t for lp in lps for t in lp["tokens"]]
    assert "".join(tokens) == text
    offsets = [o for lp in lps for o in lp["text_offset"]]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert all(len(top) == 2 for lp in lps for top in lp["top_logprobs"])
    # the same tokens and logprobs as the whole answer
    whole = httpx.post(srv.url + "/completions", json={"prompt": Q, "max_tokens": 40, "logprobs": 2,
                                                   "temperature": 0}).json()
    w = whole["choices"][0]
    assert w["text"] == text and w["logprobs"]["tokens"] == tokens
    assert [round(x, 5) for lp in lps for x in lp["token_logprobs"]] == [round(x, 5) for x in
                                                                          w["logprobs"]["token_logprobs"]]
    # chat streams carry them too
    with httpx.stream("POST", srv.url + "/chat/completions", json={
            "messages": [{"role": "user", "content": "3+4"}], "max_tokens": 20, "logprobs": True, "stream": True}) as r:
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    assert any(c["choices"] and c["choices"][0]["logprobs"] for c in chunks)


def test_logprob_tokens_agree_with_the_text_and_offsets(srv):
    """EOS is in the listing with an empty string (the text does not hold it), and
    echo does not list a BOS the echoed text lacks."""
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "max_tokens": 80, "logprobs": 1}).json()
    c = r["choices"][0]
    assert c["finish_reason"] == "stop"
    assert "".join(c["logprobs"]["tokens"]) == c["text"]
    assert "<|endoftext|>" not in json.dumps(c["logprobs"]["tokens"])
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == r["choices"][0]["text"] == Q
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]


def test_the_chosen_token_is_in_its_own_top_list_at_the_end_of_text(srv):
    """Greedy to EOS with 2 alternatives: at every position, the listed token is a key of its
    own top list with its logprob (EOS is listed as '' in both), in both APIs, streamed or not."""
    body = {"prompt": Q, "max_tokens": 80, "logprobs": 2, "temperature": 0}
    c = httpx.post(srv.url + "/completions", json=body).json()["choices"][0]
    lp = c["logprobs"]
    assert c["finish_reason"] == "stop" and lp["tokens"][-1] == ""
    for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert tok in top and abs(top[tok] - val) < 1e-5, (tok, top)
    chat = {"messages": [{"role": "user", "content": Q}], "max_tokens": 80, "logprobs": True, "top_logprobs": 2,
            "temperature": 0}
    for stream in (False, True):
        if stream:
            with httpx.stream("POST", srv.url + "/chat/completions", json={**chat, "stream": True}) as r:
                events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            content = [e for ev in events for ch in ev["choices"] for e in ((ch.get("logprobs") or {}).get("content")
                                                                             or [])]
        else:
            content = httpx.post(srv.url + "/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
        assert content
        for e in content:
            assert e["token"] in [t["token"] for t in e["top_logprobs"]], (stream, e)


def test_a_prompt_too_long_for_its_max_tokens_is_a_400(srv):
    ctx = httpx.get(srv.url + "/models").json()["data"][0]["max_model_len"]
    prompt = "Q: " + "1+" * 200 + "1\n"
    r = httpx.post(srv.url + "/completions", json={"prompt": prompt, "max_tokens": ctx - 10})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert "lower max_tokens" in r.json()["error"]["message"]
    # without max_tokens the default fits
    assert httpx.post(srv.url + "/completions", json={"prompt": prompt}).status_code == 200


def test_http_edges(srv):
    r = httpx.post(srv.url + "/completions", content=json.dumps({"prompt": Q}), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]})
    assert r.status_code == 400 and "messages[0].content[1]" in r.json()["error"]["message"], r.text
    r = httpx.get(_root(srv) + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(srv.url + "/completions")
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("GET is not allowed")
    assert httpx.get(srv.url + "/models/arith").json()["id"] == "arith"
    r = httpx.get(srv.url + "/models/gpt-9")
    assert r.status_code == 404 and "arith" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "suffix": "done"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = httpx.post(srv.url + "/completions", json={"prompt": Q, "best_of": 1, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_best_of_returns_the_most_likely_and_bills_all(srv):
    body = {"prompt": Q, "max_tokens": 40, "temperature": 1.0, "seed": 3, "logprobs": 0}
    many = httpx.post(srv.url + "/completions", json={**body, "n": 4}).json()
    best = httpx.post(srv.url + "/completions", json={**body, "n": 1, "best_of": 4}).json()
    scores = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in many["choices"]}
    assert best["choices"][0]["text"] == max(scores, key=scores.get)
    assert best["usage"]["completion_tokens"] == many["usage"]["completion_tokens"]


def test_include_usage_false_leaves_out_the_usage_chunk(srv):
    with_usage = _events(srv, {"prompt": Q, "max_tokens": 20})
    assert "usage" in with_usage[-1]
    without = _events(srv, {"prompt": Q, "max_tokens": 20, "stream_options": {"include_usage": False}})
    assert not any("usage" in e for e in without)


def test_metrics_show_what_vllm_users_watch(srv):
    long_q = "Q: 3+4-2+8-1+5-3+7-2+6-4+1\n"  # over 16 tokens: a prefix the cache reuses (REUSE_BLOCK)
    httpx.post(srv.url + "/completions", json={"prompt": long_q, "max_tokens": 30, "n": 2, "temperature": 1.0})
    httpx.post(srv.url + "/completions", json={"prompt": long_q, "max_tokens": 30})
    text = httpx.get(_root(srv) + "/metrics").text
    values = {line.split(" ")[0].split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("ponder:num_requests_running", "ponder:num_requests_waiting", "ponder:kv_cache_bytes",
                 "ponder:prefix_cache_queries", "ponder:prefix_cache_hits"):
        assert name in values, name
    assert values["ponder:generation_tokens_total"] > 0 and values["ponder:prompt_tokens_total"] > 0
    assert values["ponder:time_to_first_token_seconds_count"] >= 2
    assert values["ponder:time_per_output_token_seconds_count"] >= 3
    assert values["ponder:prefix_cache_hits"] > 0  # the same prompt twice
    assert 'ponder:request_success_total{finished_reason="stop"' in text or "finished_reason" in text


def test_shutdown_answers_503_and_ends_streams_with_an_error_event():
    s = ponder_serve()
    try:
        long = {"prompt": [f"Q: {i}+1\n" for i in range(64)], "max_tokens": 400, "temperature": 1.0,
                "ignore_eos": True, "n": 64}
        box: dict = {}
        plain = threading.Thread(target=lambda: box.update(r=httpx.post(s.url + "/completions", json=long,
                                                                        timeout=60)))

        def streamed() -> None:
            lines = []
            with httpx.stream("POST", s.url + "/completions", json={**long, "prompt": long["prompt"][:8],
                                                                       "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    box["started"] = True
            box["stream"] = lines

        st = threading.Thread(target=streamed)
        st.start()
        deadline = time.monotonic() + 30
        while not box.get("started") and time.monotonic() < deadline:
            time.sleep(0.01)
        plain.start()
        time.sleep(1.5)
        t0 = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        plain.join(30), st.join(30)
        assert time.monotonic() - t0 < 10
        r = box["r"]
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text[:300]
        data = [x for x in box["stream"] if x.startswith("data: ")]
        assert data, (box["stream"], s.tail())
        assert data[-1] == "data: [DONE]" and "shutting down" in data[-2], data[-3:]
        assert s.proc.wait(15) is not None
    finally:
        s.stop()


def test_errors_name_the_field_the_request_sent(srv):
    """A strategy setting is named as sent (ponder.settings.samples, not the generator's n);
    max_completion_tokens is named as sent (not max_tokens, which the request did not send)."""
    body = {"prompt": Q, "ponder": {"strategy": "prm-beam", "settings": {"samples": 0}}}
    r = httpx.post(srv.url + "/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "ponder.settings.samples", r.text
    assert err["message"].startswith("ponder.settings.samples (candidates per problem) must be"), r.text
    for v in (-3, 0, "x"):
        r = httpx.post(srv.url + "/chat/completions", json={"messages": [{"role": "user", "content": Q}],
                                                            "max_completion_tokens": v})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_completion_tokens", r.text
        assert "max_completion_tokens" in err["message"] and "max_tokens " not in err["message"], r.text
