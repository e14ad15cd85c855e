"""The ponder command, run as users run it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def ponder(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_generate_json():
    r = ponder("generate", "Q: 3+4-2\n", "--json", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (g,) = out["generations"]
    assert g["text"] == "3+4=7\n7-2=5\nAnswer: 5\n"
    assert g["finish_reason"] == "stop" and g["token_ids"]
    assert out["usage"]["generated_tokens"] == len(g["token_ids"])


def test_generate_streams_text():
    r = ponder("generate", "Q: 3+4-2\n", "--max-tokens", "40")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "3+4=7\n7-2=5\nAnswer: 5\n"
    # an escaped \n typed in a shell is read as a newline
    r2 = ponder("generate", "Q: 3+4-2\\n", "--max-tokens", "40")
    assert r2.stdout == r.stdout


def test_generate_sampling_n_seed_stop():
    args = ["generate", "Q: 512-256+128\n", "--strategy", "sample", "--temperature", "1.2", "--top-k", "40",
            "--top-p", "0.95", "--min-p", "0.01", "--n", "3", "--seed", "11", "--stop", "Answer", "--json"]
    a, b = ponder(*args), ponder(*args)
    assert a.returncode == 0, a.stderr
    strip = lambda out: [{k: v for k, v in g.items() if k != "usage"} for g in json.loads(out)["generations"]]
    assert strip(a.stdout) == strip(b.stdout)  # all but the wall time
    gens = json.loads(a.stdout)["generations"]
    assert len(gens) == 3 and all("Answer" not in g["text"] for g in gens)


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["generate", "x", "--strategy", "sample", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["generate", "x", "--strategy", "sample", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "x", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
        (["generate", "x", "--max-tokens", "many"], "--max-tokens"),
        (["generate", "x", "--n", "0"], "n must be an integer in [1, 1000000]"),
        (["generate", "x", "--model", "no-such-model"], "neither a shipped model"),
        (["generate", "x", "--strategy", "nope"], "choose one of: greedy, sample"),
        (["generate", "x", "--top-k", "5"], "does not take --top-k; use --strategy sample"),
        (["generate", ""], "PROMPT is empty"),
        (["generate", "x", "--dtype", "float8"], "dtype must be one of float32, bfloat16"),
        (["eval", "--level", "impossible"], "level must be one of easy, medium, hard, expert"),
        (["eval", "--strategy", "best-of-n", "--limit", "2"], "needs --reward-model"),
        # issue 24: a traceback, and two that were silently wrong
        (["generate", "x", "--strategy", "beam", "--set", "early_stopping=maybe"],
         "early_stopping must be true, false or never"),
        (["generate", "x", "--strategy", "beam", "--early-stopping", "--set", "early_stopping=true"],
         "early_stopping is given twice"),
        (["generate", "x", "--strategy", "stochastic-beam", "--temperature", "0"], "needs --temperature > 0"),
        (["eval", "--strategy", "rebase", "--reward-model", "arith-reward", "--set", "samples=2.5", "--limit", "1"],
         "samples (candidates per problem) must be an integer >= 1"),
        (["generate", "x", "--dtype", "float16"], "--dtype must be one of"),
    ],
)
def test_bad_arguments_get_one_clear_line(args, phrase):
    r = ponder(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], r.stderr


def test_models_lists_shipped_models():
    r = ponder("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert "arith" in rows and rows["arith"]["parameters"] > 1_000_000
    r = ponder("models")
    assert "arith" in r.stdout


def test_eval_greedy_json():
    r = ponder("eval", "--task", "arith", "--level", "easy", "--limit", "20", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["problems"] == 20 and 0 <= res["accuracy"] <= 1
    from ponder.evaluate import wilson_interval

    assert res["ci95"] == pytest.approx(list(wilson_interval(res["correct"], 20)))
    assert res["accuracy"] == res["correct"] / 20
    assert res["usage_total"]["generated_tokens"] > 0
    assert res["usage_per_problem"]["generated_tokens"] == pytest.approx(res["usage_total"]["generated_tokens"] / 20)


def test_core_does_not_import_transformers():
    code = ("import sys, ponder.cli, ponder.backends.native, ponder.decoding.generate, ponder.evaluate, "
            "ponder.strategies, ponder.meta.parallel, ponder.scoring.reward; "
            "print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_eval_nests_majority_over_speculative_sampling():
    # majority vote whose samples come from speculative sampling with the draft model
    r = ponder("eval", "--level", "medium", "--limit", "4", "--strategy", "majority", "--samples", "4",
               "--temperature", "0.7", "--set", "over=speculative", "--set", "over.num_draft_tokens=3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["problems"] == 4 and res["usage_total"]["generated_tokens"] > 0
    bad = ponder("eval", "--limit", "1", "--strategy", "majority", "--set", "over=speculative",
                 "--set", "over.num_beams=4")
    assert bad.returncode == 2 and "--strategy speculative does not take num_beams" in bad.stderr
    for weights, code in (("float32", 0), ("fp8", 2)):  # the draft's matrices: bfloat16 (default) or float32
        r = ponder("generate", "Q: 3+4-2\n", "--speculative", "draft", "--set", f"draft_weights={weights}", "--json")
        assert r.returncode == code, r.stderr
    assert "draft_weights must be one of float32, bfloat16; got 'fp8'" in r.stderr
    nested = ponder("eval", "--limit", "1", "--strategy", "majority", "--set", "over=best-of-n")
    assert nested.returncode == 2 and "cannot draw its samples from best-of-n" in nested.stderr


def test_eval_refinement_and_compute_optimal_from_the_command_line():
    r = ponder("eval", "--level", "hard", "--limit", "6", "--strategy", "refine-steps", "--temperature", "0.7",
               "--set", "scorer=steps", "--set", "rounds=3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["strategy"] == "refine-steps" and res["correct"] >= 4 and "pass_at_n" not in res
    # compute-optimal, its policy naming majority vote whose own settings come as majority.KEY=V
    r = ponder("eval", "--level", "hard", "--limit", "4", "--strategy", "compute-optimal", "--temperature", "0.7",
               "--set", "policy=0.25:probe,0.5:majority,1:best-of-n", "--set", "majority.samples=4",
               "--set", "best-of-n.samples=2", "--reward-model", "arith-reward", "--set", "probe=2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage_total"]["generated_tokens"] > 0
    bad = ponder("eval", "--limit", "1", "--strategy", "compute-optimal", "--set", "policy=0.25:probe,1:majority",
                 "--set", "majority.bogus=1")
    assert bad.returncode == 2 and "--strategy majority does not take bogus" in bad.stderr
    bad = ponder("eval", "--limit", "1", "--strategy", "refine-steps", "--set", "scorer=steps", "--temperature", "0")
    assert bad.returncode == 2 and "--temperature must be > 0" in bad.stderr
    listed = ponder("strategies").stdout
    for name in ("cot", "tool-use", "self-refine", "reflexion", "refine-steps", "compute-optimal"):
        assert f"\n{name} " in "\n" + listed and "[text access" in listed.split(f"\n{name} ", 1)[1].splitlines()[0]
