"""``ponder serve``'s parsing and responses, in-process (FastAPI's TestClient, no server
process): completions and chat bodies, streamed events, strategies, and every refusal
naming its field. The real-server tests (tests/e2e/) check the same behind uvicorn."""

from __future__ import annotations

import json

import pytest

Q = "Q: 3+4-2+8-1\n"


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from ponder.backends.native import NativeLM
    from ponder.scoring.reward import RewardModel
    from ponder.server.api import Limits
    from ponder.server.app import create_app

    app = create_app(NativeLM.from_pretrained("arith"), reward_model=RewardModel.from_pretrained("arith-reward"),
                     limits=Limits(max_n=8, max_tokens=256))
    with TestClient(app) as c:
        yield c


def test_a_completion_and_a_chat_completion(client):
    r = client.post("/v1/completions", json={"prompt": Q, "max_tokens": 64, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["text"].endswith("Answer: 12\n") or "Answer:" in choice["text"]
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] > 0
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == body["usage"]["total_tokens"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": Q}], "max_tokens": 32,
                                                  "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_n_seed_logprobs_and_token_ids(client):
    body = {"prompt": Q, "max_tokens": 24, "temperature": 1.0, "n": 3, "seed": 5, "logprobs": 2,
            "return_token_ids": True}
    a, b = client.post("/v1/completions", json=body).json(), client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded
    for c in a["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(c["token_ids"])
        assert all(len(t) <= 2 for t in lp["top_logprobs"])


def test_a_stream_is_the_same_text_in_events(client):
    whole = client.post("/v1/completions", json={"prompt": Q, "max_tokens": 48, "temperature": 0}).json()
    text, usage = "", None
    with client.stream("POST", "/v1/completions", json={"prompt": Q, "max_tokens": 48, "temperature": 0,
                                                        "stream": True}) as r:
        assert r.status_code == 200
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        ev = json.loads(line[6:])
        if ev["choices"]:
            text += ev["choices"][0]["text"]
        else:
            usage = ev["usage"]
    assert text == whole["choices"][0]["text"] and usage["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_a_strategy_runs_server_side_with_its_bill(client):
    r = client.post("/v1/completions", json={"prompt": Q, "max_tokens": 64, "temperature": 0.7, "seed": 1,
                                             "ponder": {"strategy": "best-of-n", "settings": {"samples": 4}}})
    body = r.json()
    assert r.status_code == 200, body
    assert body["ponder"]["strategy"] == "best-of-n" and body["usage"]["completion_tokens"] > 24
    strategies = client.get("/v1/strategies").json()["data"]
    assert {"majority", "prm-beam", "compute-optimal"} <= {s["id"] for s in strategies}
    assert client.get("/v1/models").json()["data"][0]["owned_by"] == "ponder"


@pytest.mark.parametrize("body,status,field", [
    ({"prompt": Q, "temprature": 0.5}, 400, "temprature"),
    ({"prompt": Q, "temperature": -1}, 400, "temperature"),
    ({"prompt": Q, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": Q, "n": 9}, 400, "n"),
    ({"prompt": Q, "logprobs": 21}, 400, "logprobs"),
    ({"prompt": Q, "stop": [""]}, 400, "stop"),
    ({"prompt": Q, "logit_bias": {"999": 1}}, 400, "logit_bias"),
    ({"prompt": Q, "model": "gpt-4"}, 404, "model"),
    ({"prompt": Q, "ponder": {"strategy": "majority", "settings": {"samples": 16}}}, 400, "ponder.settings"),
    ({"prompt": Q, "ponder": {"strategy": "best-of-n", "settings": {"samples": 0}}}, 400, "ponder.settings.samples"),
    ({"prompt": Q, "ponder": {"strategy": "nope"}}, 400, "ponder.strategy"),
    ({"prompt": Q, "stream": True, "ponder": {"strategy": "majority"}}, 400, "stream"),
    ({"prompt": ""}, 400, "prompt"),
])
def test_a_refusal_names_its_field(client, body, status, field):
    r = client.post("/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == field, (r.status_code, err)


def test_what_is_not_json_or_not_a_route(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/completions").status_code == 405
