"""Constrained decoding through llguidance, and token healing, on the shipped model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from ponder.decoding.beam import BeamSearch
from ponder.decoding.constraints import Grammar, heal_prompt
from ponder.decoding.generate import Greedy, Sample
from ponder.decoding.common_adapters import SettingError

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "op": {"enum": ["add", "sub", "mul"]},
        "terms": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 99}, "minItems": 1, "maxItems": 3},
        "result": {"type": "integer", "minimum": -100, "maximum": 100},
        "check": {"type": "object", "properties": {"ok": {"type": "boolean"}, "steps": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["ok", "steps"], "additionalProperties": False},
    },
    "required": ["name", "op", "terms", "result", "check"],
    "additionalProperties": False,
}
REGEX = r"-?[0-9]{1,2}([+-][0-9]){1,3}=-?[0-9]{1,3}"


def test_json_schema_samples_all_validate(arith_lm):
    g = Grammar.json_schema(arith_lm, SCHEMA)
    gens = Sample(arith_lm, max_tokens=120, constraint=g.constraint()).generate("Q: 3+4-1\n", n=100, seed=0)
    assert len(gens) == 100
    for x in gens:
        assert x.finish_reason == "stop", x.text
        jsonschema.validate(json.loads(x.text), SCHEMA)
    assert len({x.text for x in gens}) > 50  # sampling still samples


def test_regex_samples_all_fullmatch(arith_lm):
    g = Grammar.regex(arith_lm, REGEX)
    gens = Sample(arith_lm, temperature=1.5, max_tokens=40, constraint=g.constraint()).generate("Q: 5-2+8\n", n=100, seed=1)
    for x in gens:
        assert re.fullmatch(REGEX, x.text), x.text
    assert len({x.text for x in gens}) > 20


def test_constraints_hold_under_beam_search(arith_lm):
    js = Grammar.json_schema(arith_lm, SCHEMA)
    rx = Grammar.regex(arith_lm, REGEX)
    prompts = [f"Q: {a}+{b}\n" for a in range(5) for b in range(5)]  # 25 prompts x 4 beams = 100
    n_json = n_regex = 0
    for i, p in enumerate(prompts):
        g = js if i % 2 == 0 else rx
        for x in BeamSearch(arith_lm, num_beams=4, max_tokens=90, constraint=g.constraint()).generate(p, n=4):
            if g is js:
                jsonschema.validate(json.loads(x.text), SCHEMA)
                n_json += 1
            else:
                assert re.fullmatch(REGEX, x.text), x.text
                n_regex += 1
    assert n_json + n_regex == 100


def test_choice_and_lark(arith_lm, tmp_path):
    c = Grammar.choice(arith_lm, ["yes", "no", "maybe not"])
    outs = {x.text for x in Sample(arith_lm, max_tokens=10, constraint=c.constraint()).generate("Q: 1+1\n", n=30, seed=0)}
    assert outs <= {"yes", "no", "maybe not"} and len(outs) >= 2
    lark = tmp_path / "sum.lark"
    lark.write_text('start: NUM "+" NUM "=" NUM\nNUM: /[0-9]{1,2}/\n')
    lg = Grammar.lark(arith_lm, str(lark))
    for x in Sample(arith_lm, max_tokens=12, constraint=lg.constraint()).generate("Q: 2+2\n", n=20, seed=0):
        assert re.fullmatch(r"[0-9]{1,2}\+[0-9]{1,2}=[0-9]{1,2}", x.text), x.text
    # greedy under a constraint is the argmax among legal tokens: the model's own line is legal
    # up to its newline, which the grammar forbids, so the model must add a digit or stop
    assert Greedy(arith_lm, max_tokens=12, constraint=lg.constraint()).generate("Q: 2+2\n")[0].text.startswith("2+2=4")


def test_bad_and_unsatisfiable_grammars_fail_before_generation(arith_lm):
    with pytest.raises(SettingError, match="invalid regex.*unclosed group"):
        Grammar.regex(arith_lm, "(ab")
    with pytest.raises(SettingError, match="Unsatisfiable"):
        Grammar.json_schema(arith_lm, {"type": "integer", "minimum": 5, "maximum": 3})
    with pytest.raises(SettingError, match="invalid JSON schema"):
        Grammar.json_schema(arith_lm, '{"type": "nope"}')
    with pytest.raises(SettingError, match="neither a JSON object nor a readable file"):
        Grammar.json_schema(arith_lm, "no-such-file.json")
    with pytest.raises(SettingError, match="unknown name"):
        Grammar.lark(arith_lm, "start: foo")
    with pytest.raises(SettingError, match="cannot be satisfied"):
        Grammar.regex(arith_lm, r"a[^\x00-\U0010FFFF]")
    with pytest.raises(SettingError, match="one constraint"):
        Grammar.from_settings(arith_lm, regex="a", choice=["b"])
    with pytest.raises(SettingError, match="non-empty"):
        Grammar.choice(arith_lm, [])


def test_matcher_state_forks_and_rolls_back(arith_lm):
    g = Grammar.regex(arith_lm, r"[0-9]+\+[0-9]+")
    ids = arith_lm.encode("12+3", add_special_tokens=False)
    V = arith_lm.vocab_size
    zeros = torch.zeros(1, V)

    def mask(proc, rows=1):
        return torch.isfinite(proc(None, torch.zeros(rows, V)))

    a = g.constraint()
    mask(a)
    for t in ids[:2]:  # "1", "2"
        a.accept(torch.tensor([t]))
    after_12 = mask(a)
    b = a.fork([0, 0])  # two independent copies of that state
    b.accept(torch.tensor([ids[2], ids[0]]))  # row 0 takes "+", row 1 another digit
    m = mask(b, 2)
    assert not m[0].equal(m[1])  # "+" leads to digits only; a digit still allows "+"
    b.rollback(1)
    assert mask(b, 2).equal(after_12.expand(2, -1))
    assert mask(a).equal(after_12)  # the parent did not move
    fresh = g.constraint()
    fresh(None, zeros)
    assert not mask(fresh).equal(after_12)  # start state: digits only, no "+"
    assert g.accepts("12+3") and not g.accepts("12+")


def test_token_healing_respells_the_cut_token(arith_lm):
    # "Answ" is a token the model never saw in training (it always reads "Answer")
    prompt = "Q: 3+4\n3+4=7\nAnsw"
    ids = arith_lm.encode(prompt)
    short, cut = heal_prompt(arith_lm, ids)
    assert cut == "Answ" and short == ids[:-1]
    plain = Greedy(arith_lm, max_tokens=8).generate(prompt)[0]
    healed = Greedy(arith_lm, max_tokens=8, token_healing=True).generate(prompt)[0]
    assert arith_lm.decode([healed.token_ids[0]]) == "Answer"  # the boundary is re-tokenized
    assert healed.text == arith_lm.decode(healed.token_ids)[len("Answ"):]  # "Answ" is not output twice
    assert healed.text == "er: 7\n" and plain.text != healed.text
    streamed = "".join(e.text for e in Greedy(arith_lm, max_tokens=8, token_healing=True).stream(prompt))
    assert streamed == healed.text


def test_cli_constraints(tmp_path):
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["a"], "additionalProperties": False})
    run = lambda *a: subprocess.run([sys.executable, "-m", "ponder.cli", "generate", *a], capture_output=True, text=True)
    r = run("Q: 3+4\\n", "--json-schema", schema, "--strategy", "sample", "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["generations"][0]["text"]
    assert 0 <= json.loads(out)["a"] <= 9
    r = run("Q: 3+4\\n", "--choice", "yes", "--choice", "no")
    assert r.returncode == 0 and r.stdout.strip() in ("yes", "no")
    r = run("Q: 3+4\\n", "--regex", "(ab")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unclosed group" in r.stderr
    r = run("Q: 3+4\\n", "--regex", "[0-9]", "--strategy", "contrastive-search")
    assert r.returncode == 2 and "does not take a constraint" in r.stderr


def test_mask_unpacking_is_the_same_on_either_byte_order(monkeypatch):
    """llguidance's bitmask (bit i of word w = token 32w + i) unpacks to the same tokens
    through np.unpackbits (little-endian) and through the shift fallback."""
    import types

    import numpy as np

    from ponder.decoding import constraints

    rng = np.random.default_rng(0)
    bits = rng.integers(-2**31, 2**31, size=(3, 9), dtype=np.int64).astype(np.int32)
    fast = constraints._allowed(bits, 270)
    expected = np.array([[(int(bits[b, t // 32]) >> (t % 32)) & 1 for t in range(270)] for b in range(3)], dtype=bool)
    assert (fast == expected).all()
    monkeypatch.setattr(constraints, "sys", types.SimpleNamespace(byteorder="big"))
    assert (constraints._allowed(bits, 270) == expected).all()
