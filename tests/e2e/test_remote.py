"""The OpenAI-compatible client backend against real servers on loopback (vLLM's CPU
build, ``transformers serve``, ``ponder serve``), replicas with failover, and faults
injected by a proxy in front of a real server."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from ponder import strategies
from ponder.backends.native import NativeLM
from ponder.backends.openai import OpenAILM
from ponder.errors import BackendError, SettingError
from ponder.params import SamplingParams
from ponder.protocols import Access, AccessError
from ponder.scoring.reward import RewardModel
from ponder.tasks.registry import load_task

from servers import ARITH, FaultProxy, ponder_serve, stop_vllm, transformers_serve, vllm_serve

pytestmark = pytest.mark.slow

TASK = load_task("arith")
PROBLEMS = TASK.problems("hard", 8)
PROMPTS = [TASK.prompt(p) for p in PROBLEMS]


@pytest.fixture(scope="module")
def native():
    return NativeLM.from_pretrained("arith")


@pytest.fixture(scope="module")
def reward():
    return RewardModel.from_pretrained("arith-reward")


@pytest.fixture(scope="module")
def native_greedy(native):
    gen = strategies.build("greedy", native, SamplingParams(max_tokens=160))
    return [g[0].text for g in gen.generate_batch(PROMPTS)]


@pytest.fixture(scope="module")
def vllm():
    srv = vllm_serve()
    yield srv
    stop_vllm(srv)


@pytest.fixture(scope="module")
def hf_serve():
    srv = transformers_serve()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pserve():
    srv = ponder_serve("--reward-model", "arith-reward")
    yield srv
    srv.stop()


def _strategies_run(lm, native_greedy, reward):
    """Greedy equals in-process; sampling, majority vote, best-of-N by arith-reward
    (scored in-process) and PRM beam search run and answer most problems."""
    greedy = strategies.build("greedy", lm, SamplingParams(max_tokens=160))
    assert [g[0].text for g in greedy.generate_batch(PROMPTS)] == native_greedy
    ctx = strategies.Context(task=TASK, reward_model=reward)
    p = SamplingParams(temperature=0.7, max_tokens=160)
    sample = strategies.build("sample", lm, p)
    outs = sample.generate_batch(PROMPTS[:2], n=4, seed=5)
    assert [len(o) for o in outs] == [4, 4]
    assert all(g.usage.generated_tokens > 0 for o in outs for g in o)
    correct = {}
    for name, settings in (("majority", {"samples": 4}), ("best-of-n", {"samples": 4}),
                           ("prm-beam", {"samples": 4, "beam_width": 2})):
        gen = strategies.build(name, lm, p, settings, ctx)
        res = gen.generate_batch(PROMPTS, n=1, seed=0)
        correct[name] = sum(TASK.check_answer(pr, r[0].text) for pr, r in zip(PROBLEMS, res))
        assert all(r[0].usage.generated_tokens > 0 for r in res), name
    assert all(c >= 3 for c in correct.values()), correct  # greedy gets about half of the hard set
    return correct


def test_vllm_logprobs_level(vllm, native, native_greedy, reward):
    lm = OpenAILM(vllm.url, tokenizer=ARITH)
    assert lm.access == Access.LOGPROBS and lm.supports_n and lm.scores_prompts
    # prompt scoring by echo equals the in-process model's log-probabilities
    conts = ["3+4=7\n", "3+4=8\n"]
    remote = asyncio.run(lm.score(PROMPTS[0], conts))
    local = asyncio.run(native.score(PROMPTS[0], conts))
    assert [len(r) for r in remote] == [len(x) for x in local]
    assert all(abs(a - b) < 2e-3 for r, x in zip(remote, local) for a, b in zip(r, x))
    # the same without a tokenizer: token boundaries from the echoed offsets
    bare = OpenAILM(vllm.url)
    assert all(abs(a - b) < 2e-3 for r, x in zip(asyncio.run(bare.score(PROMPTS[0], conts)), local) for a, b in zip(r, x))
    # top-k logprobs come back by token id; n and a seed reproduce
    gens = asyncio.run(lm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, n=3, seed=3, logprobs=2,
                                                                max_tokens=30)))[0]
    again = asyncio.run(lm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=30)))[0]
    assert [g.text for g in gens] == [g.text for g in again]
    assert all(isinstance(k, int) for k in gens[0].top_logprobs[0]) and len(gens[0].top_logprobs[0]) == 2
    assert gens[0].usage.prompt_tokens > 0 and gens[1].usage.prompt_tokens == 0  # the prompt billed once
    assert gens[0].meta["usage_counted_by"] == "server"
    # weighted vote by sequence probability needs logprobs: it runs here
    gen = strategies.build("weighted-majority", lm, SamplingParams(temperature=0.7, max_tokens=160),
                           {"samples": 4, "weight": "logprob"}, strategies.Context(task=TASK))
    assert gen.generate_batch(PROMPTS[:2], seed=0)[0][0].text
    _strategies_run(lm, native_greedy, reward)


def test_a_generative_verifier_scores_alike_in_process_behind_vllm_and_behind_ponder_serve(vllm, pserve, native):
    """GenPRM's recipe over any OpenAI-compatible completions endpoint: the critique and
    the verdict's top-20 read through the server give the in-process verifier's scores
    (tests/test_generative.py checks those against transformers)."""
    from test_generative import FMT

    from ponder.scoring.generative import GenerativeVerifier

    sols = ["", "9+9=18"]
    here = GenerativeVerifier(native, FMT)
    want = [here.score(p, sols) for p in PROMPTS[:4]]
    for srv in (vllm, pserve):
        with pytest.raises(SettingError, match="needs its tokenizer"):  # vLLM names tokens by id
            GenerativeVerifier(strategies.load_model(vllm.url + "#arith", "--model"), FMT)
        there = strategies.load_reward_model(srv.url + "#arith", fmt="genprm")  # the tokenizer found by name
        there = GenerativeVerifier(there.lm, FMT)
        for p, w in zip(PROMPTS[:4], want):
            got = there.score(p, sols)
            assert got.meta["critiques"] == w.meta["critiques"] and got.meta["unparsed"] == 0
            assert got.values == pytest.approx(w.values, rel=1e-3, abs=1e-6), srv.name
            assert got.usage.generated_tokens > 0


def test_transformers_serve_text_level(hf_serve, native_greedy, reward):
    lm = OpenAILM(hf_serve.url)
    # it accepts logprobs and n and ignores both: probing says text level, no n
    assert lm.access == Access.TEXT and not lm.supports_n and not lm.gives_top_logprobs
    with pytest.raises(AccessError, match="logits access"):
        strategies.build("beam", lm, SamplingParams(), {"num_beams": 2})
    with pytest.raises(SettingError, match="logprobs"):
        asyncio.run(lm.generate(["Q: 1+1\n"], SamplingParams(logprobs=2)))
    with pytest.raises(SettingError, match="typical_p"):
        strategies.build("sample", lm, SamplingParams(typical_p=0.5))
    # n falls back to parallel requests: 4 samples come back from a server that gives 1
    outs = asyncio.run(lm.generate([PROMPTS[1]], SamplingParams(temperature=1.0, n=4, max_tokens=60)))
    assert len(outs[0]) == 4
    # it decodes greedily whatever the temperature unless asked through generation_config:
    # probing finds that, so the 4 samples differ
    assert lm.sampling == "generation_config" and len({g.text for g in outs[0]}) > 1
    _strategies_run(lm, native_greedy, reward)


def test_ponder_serve_backend(pserve, native, native_greedy, reward):
    lm = OpenAILM(pserve.url, tokenizer=ARITH)
    assert lm.access == Access.LOGPROBS and lm.supports_n and lm.returns_token_ids
    greedy = asyncio.run(lm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=160)))
    local = asyncio.run(native.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=160)))
    assert [g[0].token_ids for g in greedy] == [g[0].token_ids for g in local]  # token for token
    _strategies_run(lm, native_greedy, reward)


def test_ponder_serve_with_the_openai_client(pserve, native_greedy):
    import openai

    client = openai.OpenAI(base_url=pserve.url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["arith"]
    r = client.completions.create(model="arith", prompt=PROMPTS[0], max_tokens=160, temperature=0)
    assert r.choices[0].text == native_greedy[0] and r.usage.completion_tokens > 0
    r = client.completions.create(model="arith", prompt=PROMPTS[0], max_tokens=20, temperature=1.0, n=3, seed=1,
                                  logprobs=3)
    assert len(r.choices) == 3 and len(r.choices[0].logprobs.top_logprobs[0]) == 3
    assert all(x <= 0 for x in r.choices[0].logprobs.token_logprobs)
    r = client.completions.create(model="arith", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=0)
    # the listed tokens spell the echoed text (no BOS, which the text lacks): the first is
    # scored given the BOS, so it has a log-probability
    assert r.choices[0].text == PROMPTS[0] == "".join(r.choices[0].logprobs.tokens)
    assert all(x is not None and x <= 0 for x in r.choices[0].logprobs.token_logprobs)
    chat = client.chat.completions.create(model="arith", messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=160, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content == native_greedy[0]
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="arith", prompt=PROMPTS[0], max_tokens=160, temperature=0, stream=True) if c.choices)
    assert text == native_greedy[0]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="arith", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=160, temperature=0,
        stream=True) if c.choices)
    assert text == native_greedy[0]
    # a JSON schema through constrained decoding
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["answer"], "additionalProperties": False}
    r = client.chat.completions.create(model="arith", messages=[{"role": "user", "content": "Q: 1+1\n"}],
                                       max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    import json

    assert isinstance(json.loads(r.choices[0].message.content)["answer"], int)
    # a strategy server-side: usage counts every internal token, the trace comes back
    r = httpx.post(pserve.url + "/completions", json={
        "prompt": PROMPTS[0], "max_tokens": 160, "temperature": 0.7, "seed": 0,
        "ponder": {"strategy": "majority", "settings": {"samples": 4}, "trace": True}}, timeout=120).json()
    assert r["ponder"]["strategy"] == "majority" and len(r["ponder"]["outputs"][0]["trace"]) == 4
    assert r["usage"]["completion_tokens"] == sum(t["usage"]["generated_tokens"] for t in r["ponder"]["outputs"][0]["trace"])
    r = httpx.post(pserve.url + "/completions", json={
        "prompt": PROMPTS[0], "max_tokens": 160, "temperature": 0.7, "seed": 0,
        "ponder": {"strategy": "prm-beam", "settings": {"samples": 4, "beam_width": 2}}}, timeout=120).json()
    assert r["choices"][0]["text"] and "tree" in r["ponder"]["outputs"][0]["meta"]


@pytest.mark.parametrize("body, field", [
    ({"prompt": "Q: 1+1\n", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "Q: 1+1\n", "max_tokens": 10 ** 9}, "max_tokens"),
    ({"prompt": "Q: 1+1\n", "temperature": -1}, "temperature"),
    ({"prompt": "Q: 1+1\n", "top_p": 2}, "top_p"),
    ({"prompt": "Q: 1+1\n", "n": 0}, "n"),
    ({"prompt": "Q: 1+1\n", "n": 1000}, "n"),
    ({"prompt": "", "max_tokens": 4}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [10 ** 7]}, "prompt"),
    ({"prompt": "Q: 1+1\n", "stop": [3]}, "stop"),
    ({"prompt": "Q: 1+1\n", "logprobs": 50}, "logprobs"),
    ({"prompt": "Q: 1+1\n", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "Q: 1+1\n", "ponder": {"strategy": "no-such-strategy"}}, "ponder"),
    ({"prompt": "Q: 1+1\n", "ponder": {"strategy": "majority", "settings": {"bogus": 1}}}, "bogus"),
    ({"prompt": "Q: 1+1\n", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"prompt": "Q: 1+1\n", "response_format": {"type": "yaml"}}, "response_format"),
    ({"prompt": "1+" * 400}, "context"),
])
def test_ponder_serve_bad_requests(pserve, body, field):
    r = httpx.post(pserve.url + "/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] or field == r.json()["error"]["param"], r.text


def test_ponder_serve_bad_bodies(pserve):
    r = httpx.post(pserve.url + "/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(pserve.url + "/completions", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    r = httpx.post(pserve.url + "/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = httpx.post(pserve.url + "/completions", json={"model": "gpt-9", "prompt": "Q: 1+1\n"})
    assert r.status_code == 404 and "arith" in r.json()["error"]["message"]


def test_api_key_saturation_and_disconnect():
    srv = ponder_serve("--api-key", "s3cret", "--max-inflight", "1")
    try:
        assert httpx.get(srv.url + "/models").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(srv.url + "/models", headers=auth).status_code == 200
        assert httpx.get(srv.url + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # one long request in flight: the next is 429 with Retry-After
        long = {"prompt": "Q: 1+1\n", "max_tokens": 400, "temperature": 1.0, "ignore_eos": True, "n": 8}
        box = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(srv.url + "/completions", json=long,
                                                                   headers=auth, timeout=120)))
        t.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{srv.port}/health").json()["inflight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/completions", json={"prompt": "Q: 1+1\n"}, headers=auth)
        assert r.status_code == 429 and r.headers["retry-after"]
        t.join()
        assert box["r"].status_code == 200
        # a client that goes away mid-stream cancels its work
        with httpx.stream("POST", srv.url + "/completions", json={**long, "stream": True}, headers=auth,
                          timeout=60) as s:
            for _ in s.iter_lines():
                break
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{srv.port}/health").json()["inflight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health").json()["inflight"] == 0
        # a client that times out on a plain request cancels it too
        try:
            # 32 x 450 tokens: seconds of work even on a fast machine (8 x 450 once took < 0.5 s)
            r = httpx.post(srv.url + "/completions", json={**long, "max_tokens": 450, "n": 32}, headers=auth,
                           timeout=0.5)
            pytest.fail(f"answered in 0.5 s: {r.status_code} {r.text[:300]}")
        except httpx.ReadTimeout:
            pass
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{srv.port}/health").json()["inflight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"http://127.0.0.1:{srv.port}/health").json()
        assert health["inflight"] == 0 and health["engine"]["running"] == 0  # its rows left the batch
        assert health["engine"]["peak_rows"] >= 8 and health["engine"]["steps"] > 0
    finally:
        srv.stop()


def test_replicas_spread_and_failover(pserve, native_greedy):
    """Two endpoints: requests spread over both; killing one mid-run loses none."""
    second = ponder_serve()
    try:
        lm = OpenAILM([pserve.url, second.url], max_concurrency=8, attempts=6)
        prompts = PROMPTS * 6
        gen = strategies.build("greedy", lm, SamplingParams(max_tokens=160))
        first = gen.generate_batch(prompts)
        assert all(r.served > 0 for r in lm.replicas)
        assert [g[0].text for g in first] == native_greedy * 6
        killer = threading.Timer(0.3, second.kill)
        killer.start()
        outs = gen.generate_batch(prompts * 2)
        killer.join()
        assert second.proc.poll() is not None  # it did die mid-run
        assert [g[0].text for g in outs] == native_greedy * 12  # every request answered, in order, once
    finally:
        second.stop()


@pytest.mark.parametrize("fault", ["429", "503", "stall", "drop", "malformed"])
def test_faults_are_retried(pserve, native_greedy, fault):
    proxy = FaultProxy(pserve.url, [], stall_s=5)
    try:
        lm = OpenAILM(proxy.url, timeout=2.0, attempts=4)
        proxy.faults = [fault, None, fault]
        outs = asyncio.run(lm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=160)))
        assert [g[0].text for g in outs] == native_greedy[:3]
        assert lm.retries == 2 and proxy.seen.count(fault) == 2
    finally:
        proxy.close()


def test_persistent_faults_fail_clearly(pserve):
    proxy = FaultProxy(pserve.url, [])
    try:
        lm = OpenAILM(proxy.url, attempts=3, timeout=5)
        proxy.faults = ["503"] * 3
        with pytest.raises(BackendError, match=r"failed after 3 attempt.*503"):
            asyncio.run(lm.generate(["Q: 1+1\n"], SamplingParams(temperature=0)))
    finally:
        proxy.close()
    with pytest.raises(BackendError, match="is the server running"):
        OpenAILM(proxy.url)
    with pytest.raises(SettingError, match="http"):
        OpenAILM("localhost:8000")


def test_load_has_no_errors(pserve):
    """benchmarks/load.py, shortened: 16 clients for 10 s mixing short, long, streamed,
    JSON-schema and strategy requests; every answer is well formed."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from load import KINDS, run_load

    out = run_load(pserve.url, clients=16, duration=10.0)
    assert out["errors"] == 0, out["error_examples"]
    assert all(out["per_kind"][k]["requests"] > 0 for k in KINDS), out["per_kind"]


def test_a_sweep_over_vllm_resumes_from_the_store(vllm, native_greedy, tmp_path):
    """``[[model]] name = URL``: a sweep runs against the real vLLM with a request
    limit, stores every problem, and a rerun is all cache hits."""
    from ponder.sweep.run import parse_config, sweep
    from ponder.sweep.store import ResultsStore

    cfg = parse_config({
        "seed": 0, "chunk": 4,
        "model": [{"name": vllm.url, "concurrency": 4, "tokenizer": str(ARITH)}],
        "task": [{"name": "arith", "level": "hard", "limit": len(PROBLEMS)}],
        "strategy": [{"name": "greedy", "max_tokens": 160},
                     {"name": "majority", "temperature": 0.7, "max_tokens": 160, "samples": 4}],
    })
    with ResultsStore(tmp_path / "r.sqlite") as store:
        first = sweep(cfg, store)
        assert first["computed"] == 2 * len(PROBLEMS) and first["cached"] == 0
        rows = store.conn.execute("SELECT strategy, problem_id, text, generated_tokens FROM results").fetchall()
        greedy = {pid: text for s, pid, text, _ in rows if s == "greedy"}
        assert [greedy[p.id] for p in PROBLEMS] == native_greedy
        assert all(tokens > 0 for *_, tokens in rows)
        again = sweep(cfg, store)
        assert again["computed"] == 0 and again["cached"] == 2 * len(PROBLEMS)
    with pytest.raises(SettingError, match="remote model"):
        parse_config({"model": [{"name": "arith", "concurrency": 4}], "task": [{"name": "arith"}],
                      "strategy": [{"name": "greedy"}]})


def test_a_stop_string_left_in_the_text_leaves_the_ids_and_logprobs_too():
    """One rule for the ids of a generation: the server's, unless a stop string was cut
    from the text (transformers serve leaves it there), then the kept text's; the
    per-token lists are cut to match. (Choices as servers send them; no server needed.)"""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ARITH / "tokenizer.json"))
    lm = OpenAILM.__new__(OpenAILM)
    lm.tokenizer, lm.tokens_as_ids, lm.endpoint, lm.model = tok, True, "http://x/v1", "arith"
    kept, stop = "3+4=7", "\n"
    full = tok.encode(kept + stop, add_special_tokens=False).ids
    lps = [-0.1] * len(full)
    for choice in ({"text": kept + stop, "finish_reason": "stop", "token_ids": full,
                    "logprobs": {"token_logprobs": lps}},
                   {"text": kept + stop, "finish_reason": "stop",
                    "logprobs": {"tokens": [f"token_id:{i}" for i in full], "token_logprobs": lps}}):
        g = lm._generation(choice, [stop])
        assert g.text == kept and g.stop == stop
        assert g.token_ids == tok.encode(kept, add_special_tokens=False).ids
        assert len(g.logprobs) == len(g.token_ids)
    # a server that reports the stop (vLLM): its ids are taken as they are
    g = lm._generation({"text": kept, "finish_reason": "stop", "stop_reason": stop, "token_ids": full[:-1]}, [stop])
    assert g.token_ids == full[:-1] and g.text == kept


def test_a_chat_endpoint(pserve, native_greedy, reward):
    """A URL ending in /chat/completions: each prompt goes as one user message (ponder
    serve's plain template for arith renders it unchanged, so greedy equals
    in-process); n, top logprobs the chat way, and the strategies run."""
    lm = strategies.load_endpoint(pserve.url + "/chat/completions", tokenizer=str(ARITH))
    assert lm.chat and lm.access == Access.TEXT and lm.supports_n and lm.gives_top_logprobs
    greedy = strategies.build("greedy", lm, SamplingParams(max_tokens=160))
    assert [g[0].text for g in greedy.generate_batch(PROMPTS)] == native_greedy
    gens = asyncio.run(lm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, n=3, logprobs=2, max_tokens=20)))[0]
    assert len(gens) == 3 and all(g.logprobs and len(g.top_logprobs[0]) == 2 for g in gens)
    assert all(isinstance(k, int) for k in gens[0].top_logprobs[0])  # token texts mapped to ids by the tokenizer
    ctx = strategies.Context(task=TASK, reward_model=reward)
    gen = strategies.build("best-of-n", lm, SamplingParams(temperature=0.7, max_tokens=160), {"samples": 4}, ctx)
    out = gen.generate_batch(PROMPTS[:4], seed=0)
    assert sum(TASK.check_answer(p, o[0].text) for p, o in zip(PROBLEMS, out)) >= 2
    with pytest.raises(SettingError, match="all be chat or all be completions"):
        strategies.load_endpoint(pserve.url + "/chat/completions," + pserve.url + "/completions")
    with pytest.raises(SettingError, match="does not score prompts"):
        asyncio.run(lm.score(PROMPTS[0], ["3+4=7\n"]))


def test_cli_probes_an_endpoint(pserve):
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ponder.cli", "models", "--endpoint", pserve.url, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    caps = json.loads(out.stdout)
    assert caps["access"] == "logprobs" and caps["n"] and caps["prompt_scoring"] and caps["sampling"] == "standard"
    down = subprocess.run([sys.executable, "-m", "ponder.cli", "models", "--endpoint", "http://127.0.0.1:9/v1"],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and "cannot reach" in down.stderr and "is the server running" in down.stderr


def test_a_chat_endpoint_without_a_template_says_so(vllm):
    """vLLM refuses chat for a model without a chat template (400): the error carries
    the server's words and what to check."""
    with pytest.raises(BackendError) as e:
        OpenAILM(vllm.url + "/chat/completions")
    msg = str(e.value)
    assert "400" in msg and "chat template" in msg


def test_step_searches_over_vllm_with_seeds(vllm, reward):
    """PRM beam search, REBASE, MCTS (and issue 25's speculative rejection,
    reward-guided speculative decoding with a local draft, compute-optimal selection
    continuing from its probe), seeded, over 24 hard problems at once: their
    concurrent seeded requests overflowed vLLM's 2,048-token step, vLLM prefilled one
    in chunks and its CPU engine died (CPU Generator does not use offset). ponder paces
    seeded prompts below the step budget; the server stays up and every search answers.
    Bills are split among concurrent requests: they sum to the elapsed time."""
    problems = TASK.problems("hard", 24)
    prompts = [TASK.prompt(p) for p in problems]
    lm = OpenAILM(vllm.url, tokenizer=ARITH)
    assert lm.server == "vllm" and lm.seeded_prefill_tokens == 2048 - 64
    ctx = strategies.Context(task=TASK, reward_model=reward)
    p = SamplingParams(temperature=0.7, max_tokens=160)
    for name, settings, least in (("prm-beam", {"samples": 4, "beam_width": 2}, 10), ("rebase", {"samples": 4}, 12),
                                  ("mcts", {"iterations": 4}, 10),
                                  ("speculative-rejection", {"samples": 4, "reject": 0.5}, 10),
                                  ("rsd", {"threshold": 0.5}, 12),
                                  ("compute-optimal", {"probe": 2, "difficulty": "reward",
                                                       "policy": "0.3:probe,1:weighted-majority",
                                                       "weighted-majority.samples": 4}, 12)):
        gen = strategies.build(name, lm, p, settings, ctx)
        t0 = time.perf_counter()
        outs = gen.generate_batch(prompts, n=1, seed=0)
        elapsed = time.perf_counter() - t0
        right = sum(TASK.check_answer(pr, o[0].text) for pr, o in zip(problems, outs))
        print(name, right, "of", len(problems))
        assert right >= least, (name, right)
        billed = sum(o[0].usage.wall_s for o in outs)
        assert billed <= elapsed * 1.05, (name, billed, elapsed)
    assert httpx.get(vllm.url + "/models").status_code == 200  # the engine is alive


def test_remote_wall_time_bill_sums_to_elapsed(vllm):
    """majority@8 over vLLM billed 279.6 s for a 6.55 s run: each concurrent request
    was billed its whole latency. Now the time is split among the requests in flight."""
    lm = OpenAILM(vllm.url, tokenizer=ARITH)
    gen = strategies.build("majority", lm, SamplingParams(temperature=0.7, max_tokens=160), {"samples": 8},
                           strategies.Context(task=TASK))
    t0 = time.perf_counter()
    outs = gen.generate_batch(PROMPTS, seed=1)
    elapsed = time.perf_counter() - t0
    billed = sum(o[0].usage.wall_s for o in outs)
    assert 0.5 * elapsed <= billed <= 1.05 * elapsed, (billed, elapsed)
    greedy = strategies.build("greedy", lm, SamplingParams(max_tokens=160))
    t0 = time.perf_counter()
    outs = greedy.generate_batch(PROMPTS)
    elapsed = time.perf_counter() - t0
    assert sum(o[0].usage.wall_s for o in outs) <= 1.05 * elapsed


def test_a_constraint_on_a_remote_model_says_it_needs_logits(vllm):
    lm = OpenAILM(vllm.url, tokenizer=ARITH)  # a tokenizer at hand: it crashed on eos_token_ids
    bare = OpenAILM(vllm.url)  # none: the error blamed the tokenizer
    for model in (lm, bare):
        for kind, value in (("regex", "[0-9]+"), ("json_schema", '{"type": "object"}')):
            with pytest.raises(SettingError, match="needs the model's logits"):
                strategies.build("sample", model, SamplingParams(temperature=0.7), {kind: value})


def test_a_dead_server_says_one_line_per_retry_round(pserve, capfd):
    """64 concurrent requests to a server that died: a line per retry round, not one per
    request and attempt (320 lines of stamina.retry_scheduled before)."""
    import logging

    second = ponder_serve()
    lm = OpenAILM(second.url, attempts=3, timeout=5)
    second.kill()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = Keep()
    logging.getLogger("ponder.openai").addHandler(h)
    try:
        with pytest.raises(BackendError, match="failed after 3 attempt") as err:
            asyncio.run(lm.generate(["Q: 1+1\n"] * 64, SamplingParams(temperature=0)))
    finally:
        logging.getLogger("ponder.openai").removeHandler(h)
        second.stop()
    assert 1 <= len(records) <= 2, records  # attempts 2 and 3
    assert all("retrying" in r and r.count(second.url) == 1 for r in records), records  # the URL once a line
    msg = str(err.value)
    assert msg.count(second.url) == 1 and msg.count("ConnectError") == 1 and "(3 times)" in msg, msg
    assert "stamina" not in capfd.readouterr().err


def test_adaptive_methods_over_vllm_decide_as_in_process(vllm):
    """Adaptive consistency and DeepConf online against the real vLLM: each stops where
    its rule, replayed on the samples it drew, says (the rule is the in-process one);
    DeepConf's traces cannot be cut mid-way remotely, so its rule is applied to whole
    traces (marked) and every token is billed."""
    from ponder.meta.deepconf import stopped_at

    lm = OpenAILM(vllm.url, tokenizer=ARITH)
    ctx = strategies.Context(task=TASK)
    p = SamplingParams(temperature=0.7, max_tokens=160)
    gen = strategies.build("adaptive-majority", lm, p, {"samples": 12, "batch": 3}, ctx)
    outs = gen.generate_batch([TASK.prompt(q) for q in TASK.problems("medium", 8)], seed=2)  # some settle early
    for (g,) in outs:
        answers = [gen.answer_of(t) for t in g.trace]
        stops = [k for k in range(3, len(answers) + 1, 3) if gen.settled(answers[:k], [1.0] * k, seed=k)[0]]
        assert g.meta["samples_drawn"] == (stops[0] if stops else 12)
        assert g.usage.generated_tokens == sum(t.usage.generated_tokens for t in g.trace) > 0
    assert any(o[0].meta["samples_drawn"] < 12 for o in outs)
    online = strategies.build("deepconf-online", lm, p, {"samples": 8, "warmup": 3, "keep": 0.5, "window": 8}, ctx)
    for (g,) in online.generate_batch(PROMPTS[:4], seed=2):
        assert g.meta["stopped_post_hoc"] is True
        assert g.meta["stopped_at"][3:] == [stopped_at(t.top_logprobs, g.meta["threshold"], 8) for t in g.trace[3:]]
        assert g.usage.generated_tokens == sum(t.usage.generated_tokens for t in g.trace)
