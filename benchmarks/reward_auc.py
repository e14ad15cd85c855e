"""How well reward models separate right steps from wrong ones (issue 31), on the target's
own samples: the first problems of an `arith` level's test split, 16 samples each at
T = 0.7, every step labelled by the exact checker (prefix correctness, what ponder's
format reads). For each model given, and for the confidence of each language model given
(the least log-probability of a step's tokens, its running minimum for the prefix; by
default the target's own), in one run:

* step_auc: ROC-AUC over every step (the issue's bar is 0.95 at the main level);
* first_error_auc: over the steps whose prefix was right, i.e. can it see a slip as it
  happens;
* after_error_auc: steps after an error against right steps, i.e. does it remember;
* by_position: step_auc at step 1, 2, ...

    python benchmarks/reward_auc.py [--level expert] [--problems 200] [--models arith-reward,FOLDER] [--confidence arith,FOLDER]

The last line is one JSON object; "step_auc" (per model) is the main figure and
"step_auc_ratio" the second model's over the first's.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def figures(scores: list[float], labels: list[bool], before: list[bool], position: list[int]) -> dict:
    from ponder.evaluate import roc_auc

    def auc(idx):
        a = roc_auc([scores[i] for i in idx], [labels[i] for i in idx])
        return None if a is None else round(a, 4)

    every = range(len(scores))
    at = [[i for i in every if position[i] == k] for k in range(max(position) + 1)]
    return {"step_auc": auc(every),
            "first_error_auc": auc([i for i in every if before[i]]),
            "after_error_auc": auc([i for i in every if not before[i] or labels[i]]),
            # the positions with over 50 steps, right and wrong both among them
            "by_position": [auc(ix) for ix in at if len(ix) > 50 and 0 < sum(labels[i] for i in ix) < len(ix)]}


def self_confidence(lm, rm, prompt: str, text: str, n_steps: int) -> list[float]:
    """A language model's least token log-probability within each step, as a running minimum."""
    ids, ends, _ = rm.layout(prompt, text)
    with torch.no_grad():
        lp = torch.log_softmax(lm.logits(lm(torch.tensor([ids])))[0].float(), -1)  # [T, V]
    tok = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # tok[i - 1]: log p(ids[i])
    out, run = [], 0.0
    start = len(rm.layout(prompt, "")[0]) - 1  # the first step starts after the prompt
    for k, e in enumerate(ends[:n_steps]):
        s = ends[k - 1] + 1 if k else start
        run = min(run, tok[s - 1 : e].min().item())
        out.append(run)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--level", default="expert")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--models", default="arith-reward", help="comma-separated shipped names or folders")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--confidence", default="arith", help="comma-separated language models (names or folders) whose "
                    "confidence in the target's samples is scored too; the target's own is 'arith'")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.backends.native import NativeLM
    from ponder.decoding.generate import Sample
    from ponder.models.loader import load_transformer
    from ponder.models.registry import resolve_model
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = task.problems(args.level, split="test")[: args.problems]
    prompts = [task.prompt(p) for p in problems]
    t = time.perf_counter()
    lm = NativeLM.from_pretrained("arith")
    outs = Sample(lm, temperature=0.7, max_tokens=160).generate_batch(prompts, n=args.samples, seed=0)
    texts = [[g.text for g in gs] for gs in outs]
    print(f"{sum(map(len, texts))} samples of arith in {time.perf_counter() - t:.0f} s", flush=True)
    labels, before, position = [], [], []
    for p, ts in zip(problems, texts):
        for text in ts:
            lab = task.prefix_correct(p, task.split_steps(text))
            labels += lab
            before += [True, *lab][: len(lab)]  # was the prefix before the step right
            position += list(range(len(lab)))
    result: dict = {"level": args.level, "problems": len(problems), "samples": args.samples,
                    "steps": len(labels), "right_steps": sum(labels)}
    names = [m for m in args.models.split(",") if m]
    per: dict = {}
    for name in names:
        rm = RewardModel.from_pretrained(name)
        scores = []
        for p, prompt, ts in zip(problems, prompts, texts):
            for text, sc in zip(ts, rm.step_scores(prompt, ts)):
                scores += list(sc[: len(task.split_steps(text))])
        per[name] = figures(scores, labels, before, position)
        print(f"{name}: {per[name]}", flush=True)
    rm = RewardModel.from_pretrained(names[0] if names else "arith-reward")  # its layout: where steps end
    for name in [m for m in args.confidence.split(",") if m]:
        reader = load_transformer(resolve_model(name)[0]).eval()
        conf = [s for p, prompt, ts in zip(problems, prompts, texts) for text in ts
                for s in self_confidence(reader, rm, prompt, text, len(task.split_steps(text)))]
        key = "target-confidence" if name == "arith" else f"{name}-confidence"
        per[key] = figures(conf, labels, before, position)
        print(f"{key}: {per[key]}", flush=True)
    result["models"] = per
    result["step_auc"] = {k: v["step_auc"] for k, v in per.items()}
    if len(names) >= 2 and per[names[0]]["step_auc"]:
        result["step_auc_ratio"] = round(per[names[1]]["step_auc"] / per[names[0]]["step_auc"], 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
