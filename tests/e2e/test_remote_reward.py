"""Verifiers behind the real vLLM (CPU build, `--runner pooling`), issue 30: the shipped
arith-reward served by vLLM scores as in-process within 1e-5; a Qwen-PRM-format and a
sequence RM equal their model cards' formulas through vLLM's /pooling; the client sends
each path once (a memo), batches a scoring call into one request, and refuses a server
started with the wrong flags in one line naming the flag; and PRM beam search runs with
both the policy and the verifier behind vLLM, every score it used equal to in-process."""

from __future__ import annotations

import json

import pytest

from ponder.errors import SettingError
from ponder.models.registry import resolve_model
from servers import Server, free_port, vllm_python, vllm_serve
from test_reward_formats import PROMPT, SOLUTION2, ckpts, oracle  # noqa: F401  (ckpts: the tiny checkpoints)


def pooling_server(model: str, name: str, *extra: str, max_len: int = 512) -> Server:
    port = free_port()
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_len),
           "--enforce-eager", "--runner", "pooling", *extra]
    return Server(cmd, port, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_s=300, name="vllm-pooling")


@pytest.fixture(scope="module")
def reward_server():
    path, _ = resolve_model("arith-reward")
    srv = pooling_server(str(path), "arith-reward")
    yield srv
    srv.stop()


def _paths(n_problems: int, per: int = 2) -> list[tuple[str, list[str]]]:
    from ponder.backends.native import NativeLM
    from ponder.decoding.generate import Sample
    from ponder.tasks.arith import ArithTask

    task, lm = ArithTask(), NativeLM.from_pretrained("arith")
    prompts = [task.prompt(p) for p in task.problems("hard")[:n_problems]]
    outs = Sample(lm, temperature=0.7, max_tokens=160).generate_batch(prompts, n=per, seed=0)
    return [(p, [g.text for g in gs]) for p, gs in zip(prompts, outs)]


def test_arith_reward_on_vllm_scores_as_in_process(reward_server):
    from ponder.scoring.reward import RewardModel
    from ponder.strategies import load_reward_model

    remote = load_reward_model(reward_server.url + "#arith-reward")
    local = RewardModel.from_pretrained("arith-reward")
    assert remote.fmt.name == "ponder" and "all,width=1" in remote.identity()
    requests = _paths(200)
    before = remote.requests
    got = remote.score_steps_many(requests)
    unique = len({tuple(remote.layout(p, c)[0]) for p, cs in requests for c in cs})
    assert remote.requests - before == -(-unique // remote.MAX_SEQS)  # one call: each path once, 128 a request
    want = local.score_steps_many(requests)
    diffs = [abs(a - b) for g, w in zip(got, want) for gs, ws in zip(g.steps, w.steps) for a, b in zip(gs, ws)]
    # vLLM's CPU kernels round differently from torch: measured, the median difference is 3e-8 and
    # about one score in 800 differs by 1e-5 to 1.5e-5 (a logit 9e-5 apart); in-process batched
    # against one sequence at a time differ by at most 3.7e-6
    assert len(diffs) > 1000 and max(diffs) < 3e-5 and sum(d > 1e-5 for d in diffs) <= len(diffs) // 400, (
        max(diffs), sum(d > 1e-5 for d in diffs))
    for (prompt, cs), g in zip(requests[:50], got[:50]):  # outcome scores too
        o_remote, o_local = remote.score(prompt, cs).values, local.score(prompt, cs).values
        assert max(abs(a - b) for a, b in zip(o_remote, o_local)) < 1e-5
    # the memo: the same paths again send nothing; one path one step longer sends that path only
    before, sent = remote.requests, remote.sent_tokens
    remote.score_steps_many(requests)
    assert remote.requests == before and remote.sent_tokens == sent
    prompt, cs = requests[0]
    longer = cs[0].split("Answer")[0] + "1+1=2\n"
    remote.score_steps_many([(prompt, [longer, cs[1]])])
    assert remote.requests == before + 1 and remote.sent_tokens - sent == len(remote.layout(prompt, longer)[0])


def test_bad_remote_verifiers_are_one_line(reward_server, monkeypatch):
    from ponder.strategies import load_reward_model

    with pytest.raises(SettingError, match="needs its tokenizer here"):
        load_reward_model(reward_server.url + "#nope", fmt="ponder")
    monkeypatch.setenv("PONDER_REWARD_TOKENIZER", str(resolve_model("arith-reward")[0]))
    with pytest.raises(SettingError, match="serves 'arith-reward', not 'nope'"):
        load_reward_model(reward_server.url + "#nope", fmt="ponder")
    with pytest.raises(SettingError, match="gives 1 value.*token-prm format reads 2"):
        load_reward_model(reward_server.url + "#arith-reward", fmt="token-prm")
    with pytest.raises(SettingError, match="cannot reach"):
        load_reward_model(f"http://127.0.0.1:{free_port()}/v1#arith-reward")


def _server_flags(fmt: str, folder) -> list[str]:
    """The flags README's table gives for each format (vllm serve FOLDER --runner pooling ...)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if fmt == "qwen-prm":  # STEP pooling at the tag, as `vllm serve Qwen/Qwen2.5-Math-PRM-7B` does at 151651
        return ["--pooler-config", json.dumps({"pooling_type": "STEP", "step_tag_id": tok.token_to_id("<extra_0>")})]
    if fmt in ("math-shepherd", "rlhflow"):  # the LM head's (+, -) rows as a one-label classifier
        pool = ({"task": "token_classify", "pooling_type": "STEP", "step_tag_id": tok.token_to_id("ки")}
                if fmt == "math-shepherd" else {"task": "token_classify", "pooling_type": "ALL"})
        return ["--convert", "classify", "--hf-overrides",
                json.dumps({"classifier_from_token": ["-", "+"], "method": "from_2_way_softmax"}),
                "--pooler-config", json.dumps(pool)]
    return []


@pytest.mark.parametrize("fmt", ["qwen-prm", "qwen-orm", "token-prm", "trl-prm", "math-shepherd", "rlhflow", "seq-rm"])
def test_public_formats_through_vllm_equal_their_cards(ckpts, fmt):
    """vLLM as a second oracle for every format it serves (skywork-prm's value head needs a plugin)."""
    from ponder.strategies import load_reward_model
    from test_reward_formats import SOLUTION

    folder = ckpts[fmt]
    solution = SOLUTION if fmt in ("math-shepherd", "rlhflow") else SOLUTION2
    named = fmt if fmt in ("math-shepherd", "rlhflow", "trl-prm") else None  # what config.json cannot say
    srv = pooling_server(str(folder), str(folder), *_server_flags(fmt, folder), max_len=256)  # served under its
    try:  # path: the client finds the tokenizer there
        rm = load_reward_model(f"{srv.url}#{folder}", fmt=named)
        assert rm.fmt.name == fmt
        want = oracle(fmt, folder, PROMPT, solution)
        if isinstance(want, float):
            got = rm.score(PROMPT, [solution]).values[0]
            assert abs(got - want) < 1e-5, (got, want)
        else:
            got = rm.score_steps(PROMPT, [solution]).steps[0]
            assert len(got) == len(want) == 4 and max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    finally:
        srv.stop()


def test_a_server_with_the_wrong_tag_is_refused_naming_the_flag(ckpts):
    """Qwen2ForProcessRewardModel defaults to STEP at id 151651 (Qwen's <extra_0>): on a
    vocabulary where the tag has another id, no row comes back; ponder says which flag."""
    from ponder.strategies import load_reward_model

    folder = ckpts["qwen-prm"]
    srv = pooling_server(str(folder), str(folder), "--pooler-config",
                         json.dumps({"pooling_type": "STEP", "step_tag_id": 5}), max_len=256)
    try:
        with pytest.raises(SettingError) as e:
            load_reward_model(f"{srv.url}#{folder}")
        msg = str(e.value)
        assert "step_tag_id" in msg and "--pooler-config" in msg and "\n" not in msg, msg
    finally:
        srv.stop()


def test_prm_beam_search_with_policy_and_verifier_behind_vllm(reward_server):
    """Both models behind vLLM: the search runs, and every score in its tree is the
    in-process verifier's score of that path."""
    from ponder import strategies
    from ponder.params import SamplingParams
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = task.problems("hard")[:12]
    policy_srv = vllm_serve()
    try:
        lm = strategies.load_model(policy_srv.url + "#arith", "--model")
        rm = strategies.load_reward_model(reward_server.url + "#arith-reward")
        gen = strategies.build("prm-beam", lm, SamplingParams(temperature=0.7, max_tokens=160),
                               {"samples": 4, "beam_width": 2}, strategies.Context(task=task, reward_model=rm))
        outs = gen.generate_batch([task.prompt(p) for p in problems], seed=0)
    finally:
        policy_srv.stop()
    local = RewardModel.from_pretrained("arith-reward")
    right = sum(task.check_answer(p, o[0].text) for p, o in zip(problems, outs))
    assert right >= 4, right  # greedy alone gets about half of hard problems right
    checked = 0
    for p, o in zip(problems, outs):
        tree = o[0].meta["tree"]
        stack = [(tree, "")]
        while stack:
            node, before = stack.pop()
            text = before + (node.get("step") or "")
            if node.get("score") is not None and node is not tree and not node.get("terminal"):
                steps = local.score_steps(task.prompt(p), [text]).steps[0]
                assert abs(steps[-1] - node["score"]) < 5e-5  # vLLM's CPU kernels: see the parity test above
                checked += 1
            stack.extend((c, text) for c in node["children"])
    assert checked > 20


def test_ponder_serve_scores_with_a_verifier_behind_vllm(reward_server):
    """`ponder serve --reward-model URL#MODEL`: the server's searches score through vLLM."""
    import httpx

    from servers import ponder_serve

    srv = ponder_serve("--reward-model", reward_server.url + "#arith-reward")
    try:
        r = httpx.post(srv.url + "/completions", timeout=300, json={
            "model": "arith", "prompt": "Q: 3+4-2+8-1\n", "max_tokens": 64, "temperature": 0.7, "seed": 1,
            "ponder": {"strategy": "prm-beam", "settings": {"samples": 4, "beam_width": 2}}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
    finally:
        srv.stop()
