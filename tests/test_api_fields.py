"""One table maps SamplingParams to the OpenAI API (each field's ``api`` kind in
ponder.params): for every field, the client's request body and the server's parsing of
it agree, in-process (no server started)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from ponder.backends.openai import OpenAILM
from ponder.errors import SettingError
from ponder.params import API_KINDS, SamplingParams
from ponder.server.api import COMPLETION_FIELDS, Limits, parse

# a legal value other than the default, for every field
NON_DEFAULT = {
    "n": 3, "max_tokens": 17, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.8,
    "epsilon": 0.01, "eta": 0.02, "top_n_sigma": 1.5, "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2,
    "repetition_penalty": 1.1, "frequency_penalty": 0.3, "presence_penalty": -0.4, "no_repeat_ngram_size": 3,
    "min_tokens": 2, "logit_bias": {5: -2.0, 9: 1.5}, "bad_words": ("99",), "stop": ("Answer",),
    "stop_token_ids": (7,), "ignore_eos": True, "seed": 11, "token_healing": True, "logprobs": 3,
}
NEEDS = {"mirostat_tau": {"mirostat": 1}, "mirostat_eta": {"mirostat": 1}}


def client(server: str) -> OpenAILM:
    """The client's body builder as probed against ``server`` (no connection: the
    probe's findings set by hand)."""
    lm = OpenAILM.__new__(OpenAILM)
    lm.model, lm.chat, lm.server, lm.endpoint = "arith", False, server, "http://127.0.0.1:1/v1"
    lm.gives_top_logprobs, lm.returns_token_ids, lm.tokens_as_ids, lm.sampling = True, True, True, "native"
    return lm


def test_every_field_has_an_api_kind_and_a_test_value():
    names = {f.name for f in fields(SamplingParams)}
    assert names == set(NON_DEFAULT)
    assert {f.metadata["api"] for f in fields(SamplingParams)} <= set(API_KINDS)
    assert set(SamplingParams.api_fields(*API_KINDS)) == names


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_the_clients_body_is_what_the_server_parses(name):
    params = SamplingParams(**{**NEEDS.get(name, {}), name: NON_DEFAULT[name]})
    lm = client("ponder")
    lm.check(params)  # ponder serve takes every field
    body = json.loads(json.dumps(lm._body("Q: 3+4\n", params, params.n, params.seed)))  # over the wire
    assert set(body) <= COMPLETION_FIELDS
    job = parse(body, chat=False, limits=Limits(), context=512, served="arith", vocab=264)
    got = job.params
    if name == "logprobs":
        assert job.top_logprobs == NON_DEFAULT["logprobs"]
    assert getattr(got, name) == getattr(params, name), (name, body)
    for other in NEEDS.get(name, {}):
        assert getattr(got, other) == getattr(params, other)


@pytest.mark.parametrize("name", SamplingParams.api_fields("ponder"))
def test_a_field_that_needs_logits_is_refused_for_another_server_and_never_sent(name):
    params = SamplingParams(**{**NEEDS.get(name, {}), name: NON_DEFAULT[name]})
    lm = client("vllm")
    with pytest.raises(SettingError, match="logits"):
        lm.check(params)
    assert name not in lm._body("Q: 3+4\n", params, 1, None)


def test_the_server_refuses_what_no_field_declares():
    with pytest.raises(Exception, match="unknown field 'typical'"):
        parse({"prompt": "Q: 1+1\n", "typical": 0.5}, chat=False, limits=Limits(), context=512, served="arith")
