"""PRM beam search with the verifier in-process against the same verifier behind vLLM's
pooling runner (issue 30), the policy in-process in both: the time of each, the tokens
the verifier computed per unique path token (in-process: the radix cache; remote: the
client memo, vLLM recomputing whatever a request carries), and the verifier requests
per problem per search step. Then, in-process, a Qwen-PRM-format verifier (chat layout,
Linear-ReLU-Linear head; random weights of arith-reward's size: a timing, not a score)
against ponder's own format: PRM beam search's time over best-of-N's, for each.

    python benchmarks/remote_scoring.py [--problems 100] [--n 16] [--threads 1]

The last line is one JSON object; "remote_over_in_process_time" is the main figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _serve(path: Path, name: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """vLLM's CPU server on a free loopback port (as tests/servers.py starts it)."""
    import httpx

    root = Path(__file__).resolve().parents[1]
    py = os.environ.get("PONDER_VLLM_PYTHON") or str(root / ".vllm-venv" / "bin" / "python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tempfile.mktemp(prefix="vllm-", suffix=".log"), "w")
    proc = subprocess.Popen([py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name",
                             name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "512", "--enforce-eager", *extra], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit("vLLM did not start")


def _serve_reward(path: Path) -> tuple[subprocess.Popen, str]:
    return _serve(path, "arith-reward", "--runner", "pooling")


def _unique_path_tokens(outs: list, rm, prompts: list[str]) -> int:
    """Tokens of every distinct path prefix the search scored (each node's path once)."""
    seen = set()
    for prompt, o in zip(prompts, outs):
        stack = [(o[0].meta["tree"], "")]
        while stack:
            node, before = stack.pop()
            text = before + (node.get("step") or "")
            if node.get("children") or node.get("score") is not None:
                seen.add(tuple(rm.layout(prompt, text)[0]))
            stack.extend((c, text) for c in node["children"])
    # a path shares its prefix with its parent's: count the new tokens of each distinct path once
    tokens, prefixes = 0, set()
    for ids in sorted(seen, key=len):
        k = max((n for n in range(len(ids), 0, -1) if ids[:n] in prefixes), default=0)
        tokens += len(ids) - k
        prefixes.update(ids[:n] for n in range(1, len(ids) + 1))
    return tokens


def _qwen_format_verifier(like: Path, out: Path) -> Path:
    """A Qwen2.5-Math-PRM-format checkpoint of arith-reward's size (random weights) on
    arith's tokenizer with <extra_0> and a ChatML template: the format's cost, not its scores."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    cfg = json.loads((like / "config.json").read_text())
    tok = Tokenizer.from_file(str(like / "tokenizer.json"))
    tok.add_special_tokens(["<extra_0>", "<|im_start|>", "<|im_end|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    h, V = cfg["hidden_size"], tok.get_vocab_size()
    cfg.update(architectures=["Qwen2ForProcessRewardModel"], model_type="qwen2", vocab_size=V, num_labels=2)
    (out / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file

    sd = load_file(str(like / "model.safetensors"))
    sd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"],
                                                 torch.randn(V - sd["model.embed_tokens.weight"].shape[0], h) * 0.02])
    for k in [k for k in sd if k.startswith("score")]:
        sd.pop(k)
    for k in [k for k in sd if "proj" in k and k.endswith("weight") and ("q_proj" in k or "k_proj" in k or "v_proj" in k)]:
        sd[k.replace("weight", "bias")] = torch.zeros(sd[k].shape[0])  # Qwen2 has q/k/v biases
    torch.manual_seed(0)
    sd.update({"score.0.weight": torch.randn(h, h) * 0.1, "score.0.bias": torch.zeros(h),
               "score.2.weight": torch.randn(2, h) * 0.1, "score.2.bias": torch.zeros(2)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--both-remote", type=int, default=0, metavar="P",
                    help="also run PRM beam search on P problems with the policy and the verifier both behind vLLM, "
                    "paired with in-process on the same problems (McNemar's exact test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ponder import strategies
    from ponder.backends.native import NativeLM
    from ponder.meta.search.base import tree_nodes
    from ponder.models.registry import resolve_model
    from ponder.params import SamplingParams
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = task.problems("hard")[: args.problems]
    prompts = [task.prompt(p) for p in problems]
    lm = NativeLM.from_pretrained("arith")
    params = SamplingParams(temperature=0.7, max_tokens=160)
    path, _ = resolve_model("arith-reward")

    def search(rm, name="prm-beam", **own):
        settings = {"samples": args.n, **({"beam_width": 4} if name == "prm-beam" else {}), **own}
        gen = strategies.build(name, lm, params, settings, strategies.Context(task=task, reward_model=rm))
        t = time.perf_counter()
        outs = gen.generate_batch(prompts, seed=0)
        return outs, time.perf_counter() - t

    rows = {}
    local = RewardModel.from_pretrained(path)
    outs_l, t_l = search(local)
    computed_l = sum(o[0].usage.computed_tokens for o in outs_l) - sum(
        n["usage"]["computed_tokens"] for o in outs_l for n in tree_nodes(o[0].meta["tree"]))
    uniq_l = _unique_path_tokens(outs_l, local, prompts)
    acc_l = sum(task.check_answer(p, o[0].text) for p, o in zip(problems, outs_l)) / len(problems)
    rows["in_process"] = {"s": round(t_l, 2), "accuracy": acc_l, "verifier_computed_per_unique_token":
                          round(computed_l / uniq_l, 3)}
    print(f"in-process verifier: {t_l:.1f} s, accuracy {acc_l:.3f}, verifier computed {computed_l} tokens for "
          f"{uniq_l} unique path tokens ({computed_l / uniq_l:.2f})", flush=True)
    proc, url = _serve_reward(path)
    try:
        remote = strategies.load_reward_model(url + "#arith-reward")
        outs_r, t_r = search(remote)
        steps = max(o[0].meta.get("depth", 0) for o in outs_r) or 1
        uniq_r = _unique_path_tokens(outs_r, remote, prompts)
        acc_r = sum(task.check_answer(p, o[0].text) for p, o in zip(problems, outs_r)) / len(problems)
        per_step = remote.requests / len(problems) / steps
        rows["remote"] = {"s": round(t_r, 2), "accuracy": acc_r, "requests": remote.requests,
                          "verifier_computed_per_unique_token": round(remote.sent_tokens / uniq_r, 3),
                          "requests_per_problem_per_step": round(per_step, 4)}
        print(f"vLLM verifier: {t_r:.1f} s, accuracy {acc_r:.3f}, {remote.requests} requests ({per_step:.3f} per "
              f"problem per step over {steps} steps), sent {remote.sent_tokens} tokens for {uniq_r} unique path "
              f"tokens ({remote.sent_tokens / uniq_r:.2f})", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    both = {}
    if args.both_remote:
        both = both_remote(args, task, lm, params, path)
    folder = Path(tempfile.mkdtemp(prefix="qwen-format-"))
    qwen = RewardModel.from_pretrained(_qwen_format_verifier(path, folder / "prm"))
    ratio = {}
    for name, rm in (("ponder", RewardModel.from_pretrained(path)), ("qwen-prm", qwen)):
        _, t_beam = search(rm)
        rm.clear_cache()
        _, t_best = search(rm, "best-of-n")
        ratio[name] = round(t_beam / t_best, 3)
        print(f"{name} format in-process: PRM beam {t_beam:.1f} s, best-of-{args.n} {t_best:.1f} s, ratio "
              f"{t_beam / t_best:.2f}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "remote_scoring", "problems": len(problems), "n": args.n,
                      "threads": args.threads, "rows": rows,
                      "remote_over_in_process_time": round(rows["remote"]["s"] / rows["in_process"]["s"], 3),
                      "requests_per_problem_per_step": rows["remote"]["requests_per_problem_per_step"],
                      "prm_beam_over_best_of_n_time": ratio, **both}))


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Discordant pairs (a right and b wrong, the reverse) and the exact two-sided p."""
    import math

    x = sum(1 for u, v in zip(a, b) if u and not v)
    y = sum(1 for u, v in zip(a, b) if v and not u)
    n = x + y
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(x, y) + 1)) / 2 ** n)
    return x, y, p


def both_remote(args, task, lm, params, reward_path) -> dict:
    """PRM beam search @N, policy and verifier both behind vLLM, against both in-process."""
    from ponder import strategies
    from ponder.models.registry import resolve_model
    from ponder.scoring.reward import RewardModel

    problems = task.problems("hard")[: args.both_remote]
    prompts = [task.prompt(p) for p in problems]
    settings = {"samples": args.n, "beam_width": 4}
    gen = strategies.build("prm-beam", lm, params, dict(settings),
                           strategies.Context(task=task, reward_model=RewardModel.from_pretrained(reward_path)))
    t = time.perf_counter()
    local = [task.check_answer(p, o[0].text) for p, o in zip(problems, gen.generate_batch(prompts, seed=0))]
    t_local = time.perf_counter() - t
    rproc, rurl = _serve_reward(reward_path)
    pproc, purl = _serve_policy(resolve_model("arith")[0])
    try:
        rlm = strategies.load_model(purl + "#arith", "--model", max_concurrency=64)
        rm = strategies.load_reward_model(rurl + "#arith-reward")
        gen = strategies.build("prm-beam", rlm, params, dict(settings), strategies.Context(task=task, reward_model=rm))
        t = time.perf_counter()
        remote = [task.check_answer(p, o[0].text) for p, o in zip(problems, gen.generate_batch(prompts, seed=0))]
        t_remote = time.perf_counter() - t
    finally:
        for proc in (rproc, pproc):
            proc.terminate()
            proc.wait(30)
    x, y, p = mcnemar(local, remote)
    print(f"PRM beam @{args.n} on {len(problems)} problems: in-process {sum(local) / len(local):.3f} ({t_local:.0f} s), "
          f"both behind vLLM {sum(remote) / len(remote):.3f} ({t_remote:.0f} s); discordant {x} / {y}, McNemar p = "
          f"{p:.3f}", flush=True)
    return {"both_remote": {"problems": len(problems), "in_process_accuracy": sum(local) / len(local),
                            "remote_accuracy": sum(remote) / len(remote), "discordant": [x, y], "mcnemar_p": round(p, 4),
                            "in_process_s": round(t_local, 1), "remote_s": round(t_remote, 1)}}


def _serve_policy(path: Path) -> tuple[subprocess.Popen, str]:
    return _serve(path, "arith")


if __name__ == "__main__":
    main()
