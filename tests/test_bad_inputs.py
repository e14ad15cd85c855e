"""Bad input, as a user types it: every case gets one line naming what to change and
exit status 2; no traceback, no hang, nothing silently wrong. Run in-process
(``ponder.cli.main``) so that an unexpected exception fails the test as a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ponder.cli import main
from ponder.models.registry import shipped_models


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def refused(capsys, phrase: str, *args: str) -> None:
    code, out, err = run(capsys, *args)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error:") and phrase in lines[0], err


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, str]:
    """Checkpoint folders, each broken in one way."""
    src = shipped_models()["arith"]
    root = tmp_path_factory.mktemp("broken")

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(src, d)
        return d

    out = {}
    d = copy("truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    out["truncated"] = d
    d = copy("garbage")
    (d / "model.safetensors").write_bytes(os.urandom(5000))
    out["garbage"] = d
    d = copy("empty")
    (d / "model.safetensors").write_bytes(b"")
    out["empty"] = d
    d = copy("pickle")
    import pickle

    (d / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    out["pickle"] = d
    d = copy("tokenizer")
    (d / "tokenizer.json").write_text("{not json")
    out["tokenizer"] = d
    cfg = json.loads((src / "config.json").read_text())
    for name, change in [("no_hidden", lambda c: c.pop("hidden_size")), ("list", None),
                         ("string_hidden", lambda c: c.update(hidden_size="192")),
                         ("zero_heads", lambda c: c.update(num_attention_heads=0)),
                         ("rope_no_factor", lambda c: c.update(rope_scaling={"rope_type": "linear"})),
                         ("eos_outside", lambda c: c.update(eos_token_id=10**6)),
                         ("shapes", lambda c: c.update(intermediate_size=500))]:
        d = copy(name)
        c = json.loads(json.dumps(cfg))
        if change is None:
            c = [c]
        else:
            change(c)
        (d / "config.json").write_text(json.dumps(c))
        out[name] = d
    d = copy("config_dir")
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    out["config_dir"] = d
    return {k: str(v) for k, v in out.items()}


@pytest.mark.parametrize("case, phrase", [
    ("truncated", "not a readable safetensors file"), ("garbage", "not a readable safetensors file"),
    ("empty", "not a readable safetensors file"), ("pickle", "not a readable safetensors file"),
    ("tokenizer", "not a readable tokenizer"), ("no_hidden", "'hidden_size' is missing"),
    ("list", "must hold a JSON object"), ("string_hidden", "hidden_size must be a positive integer"),
    ("zero_heads", "num_attention_heads must be a positive integer"),
    ("rope_no_factor", "needs a positive factor"), ("eos_outside", "special token ids"),
    ("shapes", "do not fit config.json"), ("config_dir", "config.json is missing"),
])
def test_broken_checkpoints_are_named(capsys, broken, case, phrase):
    refused(capsys, phrase, "generate", "Q: 1+1\n", "--model", broken[case])


@pytest.mark.parametrize("phrase, args", [
    ("--reward-model: 'nope' is neither a shipped model", ["eval", "--strategy", "best-of-n", "--limit", "2",
                                                          "--reward-model", "nope"]),
    ("--reward-model: arith is not a reward model", ["eval", "--strategy", "best-of-n", "--limit", "2",
                                                    "--reward-model", "arith"]),
    ("--prm: 'nope'", ["eval", "--limit", "2", "--prm", "nope"]),
    ("--model: arith-reward is a reward model", ["generate", "x", "--model", "arith-reward"]),
    ("--model: arith-reward is a reward model", ["eval", "--limit", "2", "--model", "arith-reward"]),
    ("--draft-model: 'nope'", ["generate", "x", "--speculative", "draft", "--draft-model", "nope"]),
    ("--draft-model: arith-reward is a reward model", ["generate", "x", "--speculative", "draft",
                                                       "--draft-model", "arith-reward"]),
    ("--set amateur: 'nope'", ["generate", "x", "--strategy", "contrastive", "--set", "amateur=nope"]),
    ("--set models: arith-reward is a reward model", ["generate", "x", "--strategy", "product",
                                                       "--set", "models=arith-reward"]),
    ("stop must be non-empty strings", ["generate", "x", "--set", "stop=123"]),
    ("weights must be comma-separated numbers", ["generate", "x", "--strategy", "product", "--set",
                                                 "models=arith-draft", "--set", "weights=a,b"]),
    ("dola_layers must be", ["generate", "x", "--strategy", "dola", "--set", "dola_layers=abc"]),
    ("ignore_eos must be true or false", ["generate", "x", "--set", "ignore_eos=maybe"]),
    ("regex is empty", ["generate", "x", "--regex", ""]),
    ("json_schema is empty", ["generate", "x", "--json-schema", ""]),
    ("grammar is empty", ["generate", "x", "--grammar", ""]),
    ("--chunk must be >= 1", ["eval", "--chunk", "-1", "--limit", "2"]),
    ("--threads must be >= 1", ["eval", "--threads", "-1", "--limit", "2"]),
    ("level must be one of easy, medium, hard, expert; got ''", ["eval", "--level", "", "--limit", "2"]),
    ("mirostat_tau must be > 0", ["generate", "x", "--strategy", "sample", "--mirostat", "2", "--mirostat-tau", "0"]),
    ("mirostat_tau and mirostat_eta need mirostat 1 or 2", ["generate", "x", "--strategy", "sample",
                                                            "--mirostat-tau", "3"]),
    ("seed must be an integer in [0, 9223372036854775806]", ["generate", "x", "--seed", str(2**63 - 1)]),
    ("n must be an integer in [1, 1000000]", ["generate", "x", "--n", str(2**70)]),
    ("--draft-tokens takes an integer in [1, 64]", ["generate", "x", "--speculative", "draft",
                                                    "--draft-tokens", str(2**70)]),
    ("logit_bias token ids must be in [0, 264)", ["generate", "x", "--logit-bias", '{"999": 1}']),
    ("stop_token_ids token ids must be in [0, 264)", ["generate", "x", "--stop-token-ids", str(10**6)]),
    ("--strategy beam does not take --token-healing", ["generate", "x", "--strategy", "beam", "--token-healing"]),
    ("--strategy smc does not take --stop", ["generate", "x", "--strategy", "smc", "--reward-model",
                                             "arith-reward", "--stop", "Answer"]),
    ("the prompt has 606 tokens", ["generate", "Q: " + "1+" * 300 + "1\n"]),
    ("not valid Unicode", ["generate", "Q: \udcff\n"]),
    ("--samples applies to strategies that draw several", ["eval", "--samples", "4", "--limit", "2"]),
    ("after processor GrammarConstraint", ["generate", "Q: 3+4\n3+4=7\nAnsw", "--token-healing",
                                           "--json-schema", '{"type":"object"}']),
])
def test_bad_cli_inputs_get_one_line(capsys, phrase, args):
    refused(capsys, phrase, *args)


def test_bad_task_files(capsys, tmp_path):
    refused(capsys, "does not exist", "eval", "--task", str(tmp_path / "missing.jsonl"))
    (tmp_path / "garbage.jsonl").write_text("{nope\n")
    refused(capsys, "line 1: not JSON", "eval", "--task", str(tmp_path / "garbage.jsonl"))
    (tmp_path / "fields.jsonl").write_text('{"question": "1+1"}\n')
    refused(capsys, "line 1: a row needs the fields question and answer; missing answer",
            "eval", "--task", str(tmp_path / "fields.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    refused(capsys, "holds no problems", "eval", "--task", str(tmp_path / "empty.jsonl"))
    refused(capsys, "a JSONL task has no levels", "eval", "--task", str(tmp_path / "fields.jsonl"), "--level", "hard")


def test_generation_ends_at_the_context(capsys):
    code, out, err = run(capsys, "generate", "Q: " + "1+" * 240 + "1\n", "--max-tokens", "1000000000",
                         "--ignore-eos", "--json")
    assert code == 0, err
    (g,) = json.loads(out)["generations"]
    assert g["finish_reason"] == "length" and g["usage"]["prompt_tokens"] + len(g["token_ids"]) == 512


def test_constrained_output_cut_by_max_tokens_says_so(capsys):
    schema = '{"type":"object","properties":{"a":{"type":"boolean"}},"required":["a"],"additionalProperties":false}'
    code, out, _ = run(capsys, "generate", "Q: 3+4\n", "--json-schema", schema, "--max-tokens", "3", "--json")
    (g,) = json.loads(out)["generations"]
    assert code == 0 and g["finish_reason"] == "length" and g["meta"]["constraint_complete"] is False
    code, out, _ = run(capsys, "generate", "Q: 3+4\n", "--json-schema", schema, "--max-tokens", "60", "--json")
    (g,) = json.loads(out)["generations"]
    assert g["meta"]["constraint_complete"] is True and "a" in json.loads(g["text"])


def test_ctrl_c_exits_130_with_one_line():
    # SIGINT as a terminal gives it, whatever the test runner inherited (a shell's background
    # job starts with SIGINT ignored, and a child would ignore the Ctrl-C this test sends)
    p = subprocess.Popen([sys.executable, "-m", "ponder.cli", "eval", "--strategy", "majority", "--samples", "16",
                          "--temperature", "0.7"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait for the line eval prints as the evaluation starts (no clock: a fast machine must not finish first)
    first = p.stderr.readline()
    assert "0/500 problems" in first, first
    p.send_signal(signal.SIGINT)
    out, rest = p.communicate(timeout=60)
    err = first + rest
    assert p.returncode == 130, (p.returncode, err[-500:])
    assert "Traceback" not in err and "interrupted" in err, err


def test_a_loop_collected_mid_interrupt_prints_no_traceback(capsys):
    """What Ctrl-C once left in CI: an event loop whose ``__del__`` fails as it is
    collected. The CLI's hook hides that case, and only that one."""
    import asyncio
    import gc

    from ponder.cli import _quiet_loop_teardown

    saved = sys.unraisablehook
    sys.unraisablehook = _quiet_loop_teardown
    try:
        loop = asyncio.new_event_loop()
        loop._selector = None  # its close() now fails inside __del__
        del loop
        gc.collect()
        assert "Traceback" not in capsys.readouterr().err

        class Other:
            def __del__(self):
                raise RuntimeError("other teardown")

        Other()
        gc.collect()
        assert "other teardown" in capsys.readouterr().err
    finally:
        sys.unraisablehook = saved


def test_help_lists_the_flags_derived_from_sampling_params(capsys):
    from dataclasses import fields

    from ponder.params import SamplingParams

    for cmd in ("generate", "eval"):
        code, out, err = run(capsys, cmd, "--help")
        assert code == 0, err
        flat = " ".join(out.split())
        skip = {"n", "logprobs"} if cmd == "eval" else set()
        for f in fields(SamplingParams):
            if f.name not in skip:
                assert "--" + f.name.replace("_", "-") in flat, (cmd, f.name)


@pytest.mark.parametrize("args, flag", [
    (("eval", "--level", "nope"), "--level"),
    (("eval", "--task", "nonexistent"), "--task"),
    (("eval", "--seed", "-1"), "--seed"),
    (("generate", "Q: 1+1\n", "--n", "0"), "--n"),
    (("generate", "Q: 1+1\n", "--strategy", "sample", "--top-k", "-1"), "--top-k"),
    (("eval", "--strategy", "prm-beam", "--reward-model", "arith-reward", "--set", "beam_width=0"), "--set beam_width"),
    (("eval", "--strategy", "prm-beam", "--reward-model", "arith-reward", "--set", "samples=0"), "--samples"),
    (("eval", "--strategy", "majority", "--set", "samples=-2"), "--samples"),
    (("eval", "--strategy", "rebase", "--reward-model", "arith-reward", "--set", "scorer=nope"), "--set scorer"),
])
def test_an_error_names_the_flag_to_change(capsys, args, flag):
    """A setting's error names the flag that sets it, not only the library's name for it."""
    code, _, err = run(capsys, *args)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
