"""Public reward-model formats (issue 30), on tiny random checkpoints built here (no
download): `ponder score` equals an oracle written from each model card within 1e-5 in
float32 - transformers' own class where it has one, else transformers' backbone with the
published head - in-process and through transformers (hf:); and the edge cases a
format meets (a step holding the marker, an empty step, a last step without its
separator, a solution past the context, a label that is two tokens)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from ponder.cli import main
from ponder.errors import SettingError
from ponder.models.registry import resolve_model

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-6)
PROMPT = "Q: 3+4-2+8\n"
SOLUTION = "3+4=7\n7-2=5\n5+8=13\nAnswer: 13\n"
SOLUTION2 = "3+4=7\n\n7-2=5\n\n5+8=13\n\nAnswer: 13"


def _tokenizer(folder: Path) -> int:
    """arith's BPE plus the markers the formats read; a ChatML template. Returns the vocab size."""
    from tokenizers import AddedToken, Tokenizer

    src, _ = resolve_model("arith")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens(["<extra_0>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens([AddedToken("ки", normalized=False), AddedToken("\n\n", normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


def _randomise(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 1:
                p.normal_(0, 0.15)
    return model.eval()


def _save(model, folder: Path, arch: str | None = None, extra: dict | None = None, rename: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for a, b in (rename or {}).items():
        sd[b] = sd.pop(a)
    sd.update(extra or {})
    model.config.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = [arch or type(model).__name__]
    cfg.pop("auto_map", None)
    cfg["torch_dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint per format."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification)

    root = tmp_path_factory.mktemp("formats")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    V = _tokenizer(tok_dir)
    out: dict[str, Path] = {}

    def folder(name: str) -> Path:
        f = root / name
        f.mkdir()
        for x in tok_dir.iterdir():
            shutil.copy(x, f / x.name)
        return f

    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0, **TINY)
    out["token-prm"] = _save(_randomise(Qwen2ForTokenClassification(Qwen2Config(num_labels=2, **common)), 1),
                             folder("token-prm"))
    out["trl-prm"] = out["token-prm"]
    out["seq-rm"] = _save(_randomise(LlamaForSequenceClassification(LlamaConfig(num_labels=1, **common)), 2),
                          folder("seq-rm"))
    out["math-shepherd"] = _save(_randomise(MistralForCausalLM(MistralConfig(**common)), 3), folder("math-shepherd"))
    out["rlhflow"] = _save(_randomise(LlamaForCausalLM(LlamaConfig(**common)), 4), folder("rlhflow"))
    torch.manual_seed(5)
    for name, labels, arch in (("qwen-prm", 2, "Qwen2ForProcessRewardModel"), ("qwen-orm", 1, "Qwen2ForRewardModel")):
        m = _randomise(Qwen2ForTokenClassification(Qwen2Config(num_labels=labels, **common)), 5 + labels)
        h = TINY["hidden_size"]
        extra = {"score.0.weight": torch.randn(h, h) * 0.15, "score.0.bias": torch.randn(h) * 0.15}
        out[name] = _save(m, folder(name), arch, extra, {"score.weight": "score.2.weight", "score.bias": "score.2.bias"})
    m = _randomise(Qwen2ForCausalLM(Qwen2Config(**common)), 9)
    out["skywork-prm"] = _save(m, folder("skywork-prm"), "Qwen2ForPrmModel",
                               {"v_head.summary.weight": torch.randn(1, TINY["hidden_size"]) * 0.15,
                                "v_head.summary.bias": torch.randn(1) * 0.15})
    return out


# -- oracles, written from the model cards ------------------------------------------------------
def _hf_tok(folder: Path):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>",
                                bos_token="<|endoftext|>")
    t.chat_template = CHATML
    return t


def _backbone_and_sd(folder: Path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).eval(), load_file(str(folder / "model.safetensors"))


def _softmax2(a: float, b: float) -> tuple[float, float]:
    m = max(a, b)
    ea, eb = math.exp(a - m), math.exp(b - m)
    return ea / (ea + eb), eb / (ea + eb)


def oracle(fmt: str, folder: Path, question: str, solution: str) -> list[float] | float:
    """Each format's score as its card computes it (one sequence, no padding)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    tok = _hf_tok(folder)
    with torch.no_grad():
        if fmt == "qwen-prm":  # make_step_rewards
            steps = [s for s in solution.split("\n\n") if s.strip()]
            msgs = [{"role": "system", "content": "Please reason step by step, and put your final answer within "
                     "\\boxed{}."}, {"role": "user", "content": question},
                    {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"}]
            ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False))
            model, sd = _backbone_and_sd(folder)
            h = model(torch.tensor([ids])).last_hidden_state[0]
            logits = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h, sd["score.0.weight"],
                                                                                       sd["score.0.bias"])),
                                                sd["score.2.weight"], sd["score.2.bias"])
            tag = tok.encode("<extra_0>", add_special_tokens=False)[0]
            return [float(logits[i].softmax(-1)[1]) for i, t in enumerate(ids) if t == tag]
        if fmt == "qwen-orm":
            msgs = [{"role": "system", "content": "Please reason step by step, and put your final answer within "
                     "\\boxed{}."}, {"role": "user", "content": question}, {"role": "assistant", "content": solution}]
            ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False))
            model, sd = _backbone_and_sd(folder)
            h = model(torch.tensor([ids])).last_hidden_state[0, -1]
            return float(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(h, sd["score.0.weight"],
                                                                                           sd["score.0.bias"])),
                                                    sd["score.2.weight"], sd["score.2.bias"])[0])
        if fmt == "seq-rm":
            msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
            ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False))
            return float(AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()(
                torch.tensor([ids])).logits[0, 0])
        if fmt == "math-shepherd":  # question + " " + "\n".join(step + " ки"), softmax over (+, -) at each tag
            steps = [s for s in solution.split("\n") if s.strip()]
            ids = tok.encode(question + " " + "\n".join(f"{s} ки" for s in steps))
            good, bad = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
            tag = tok.encode("ки", add_special_tokens=False)[-1]
            logits = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(torch.tensor([ids])).logits[0]
            return [_softmax2(float(logits[i, good]), float(logits[i, bad]))[0] for i, t in enumerate(ids) if t == tag]
        if fmt == "rlhflow":  # one user turn per step, each answered "+"; read where "+" is predicted
            steps = [s for s in solution.split("\n") if s.strip()]
            conv, out = [], []
            model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
            good, bad = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
            for k, s in enumerate(steps):
                conv.append({"role": "user", "content": question + " " + s if k == 0 else s})
                conv.append({"role": "assistant", "content": "+"})
                ids = tok.encode(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=False))
                at = len(tok.encode(tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True))) - 1
                logits = model(torch.tensor([ids])).logits[0, at]
                out.append(_softmax2(float(logits[good]), float(logits[bad]))[0])
            return out
        if fmt == "skywork-prm":  # bos + problem + "\n"; each step + "\n"; sigmoid(v_head) at each step's "\n"
            ids = tok.encode(question.rstrip("\n") + "\n")
            reads = []
            for s in [s for s in solution.split("\n") if s.strip()]:
                ids += tok.encode(s, add_special_tokens=False) + tok.encode("\n", add_special_tokens=False)
                reads.append(len(ids) - 1)
            model, sd = _backbone_and_sd(folder)
            h = model(torch.tensor([ids])).last_hidden_state[0]
            v = torch.nn.functional.linear(h, sd["v_head.summary.weight"], sd["v_head.summary.bias"])[:, 0]
            return [float(torch.sigmoid(v[i])) for i in reads]
        if fmt in ("token-prm", "trl-prm"):  # PURE: "\n" after each step, p1 - p0; TRL: "\n\n", p1
            sep = "\n" if fmt == "token-prm" else "\n\n"
            ids, reads = tok.encode(question), []
            for s in [s for s in solution.split("\n\n") if s.strip()]:
                ids += tok.encode(s, add_special_tokens=False) + tok.encode(sep, add_special_tokens=False)
                reads.append(len(ids) - 1)
            logits = AutoModelForTokenClassification.from_pretrained(str(folder)).eval()(torch.tensor([ids])).logits[0]
            p = [_softmax2(float(logits[i, 0]), float(logits[i, 1])) for i in reads]
            return [b - a for a, b in p] if fmt == "token-prm" else [b for _, b in p]
    raise ValueError(fmt)


def _score(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["score", *args, "--json"])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return json.loads(out)


NEEDS_FORMAT = {"math-shepherd", "rlhflow", "trl-prm"}  # a causal LM does not say; nor TRL's reading


@pytest.mark.parametrize("fmt", ["qwen-prm", "qwen-orm", "math-shepherd", "rlhflow", "skywork-prm", "token-prm",
                                 "trl-prm", "seq-rm"])
@pytest.mark.parametrize("backend", ["", "hf:"])
def test_ponder_score_equals_the_model_cards_formula(ckpts, capsys, fmt, backend):
    folder = ckpts[fmt]
    solution = SOLUTION2 if fmt in ("qwen-prm", "qwen-orm", "token-prm", "trl-prm", "seq-rm") else SOLUTION
    args = ["--reward-model", backend + str(folder), "--prompt", PROMPT, "--completion", solution, "--raw"]
    if fmt in NEEDS_FORMAT:
        args += ["--reward-format", fmt]
    got = _score(capsys, *args)
    want = oracle(fmt, folder, PROMPT, solution)
    assert got["format"] == fmt
    if isinstance(want, float):  # an outcome model: one score, no steps
        assert got["steps"] == [] and abs(got["score"] - want) < 1e-5, (got, want)
    else:
        assert len(got["steps"]) == len(want) == 4
        assert max(abs(a - b) for a, b in zip(got["steps"], want)) < 1e-5, (got["steps"], want)
        assert abs(got["score"] - min(want)) < 1e-5  # a process model's score: the min of its steps


def test_ponder_format_scores_its_outcome_and_steps(capsys):
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    got = _score(capsys, "--reward-model", "arith-reward", "--prompt", PROMPT, "--completion", SOLUTION, "--raw")
    assert got["format"] == "ponder" and len(got["steps"]) == 3
    # the outcome score, at the EOS; the two calls batch differently, and the built
    # model's float32 logit may then differ by an ulp (5e-7 at 5.7: 1.6e-9 after the sigmoid)
    assert abs(got["score"] - rm.score(PROMPT, [SOLUTION]).values[0]) < 1e-6
    for agg in ("product", "last"):
        g = _score(capsys, "--reward-model", "arith-reward", "--prompt", PROMPT, "--completion", SOLUTION, "--raw",
                   "--aggregation", agg)
        assert abs(g["score"] - got["score"]) < 1e-9  # ponder's own: the outcome whatever the aggregation
    g = _score(capsys, "--reward-model", "arith-reward", "--prompt", "Q: 3+4-2+8\\n",
               "--completion", "3+4=7\\n7-2=5\\n5+8=13\\nAnswer: 13\\n")  # escapes read as in generate
    assert g["steps"] == got["steps"]


def test_the_format_is_read_from_config_or_asked_for(ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "--reward-model", str(ckpts["math-shepherd"]), "--prompt", PROMPT, "--completion", SOLUTION])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and "--reward-format" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["score", "--reward-model", str(ckpts["seq-rm"]), "--reward-format", "qwen-prm", "--prompt", PROMPT,
              "--completion", SOLUTION])
    _, err = capsys.readouterr()
    assert e.value.code == 2 and "score.0.weight" in err and "--reward-format" in err, err


def test_edge_cases_of_the_layouts(ckpts):
    from ponder.scoring.reward import RewardModel

    prm = RewardModel.from_pretrained(ckpts["qwen-prm"])
    # a step holding the marker, and an empty step: still one score per real step
    a = prm.score_steps(PROMPT, ["3+4=7<extra_0>\n\n\n\n7-2=5\n\n  \n\n5+8=13"]).steps[0]
    b = prm.score_steps(PROMPT, ["3+4=7\n\n7-2=5\n\n5+8=13"]).steps[0]
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    # a last step without its separator is a step
    assert len(prm.score_steps(PROMPT, ["3+4=7\n\n7-2=5"]).steps[0]) == 2
    ms = RewardModel.from_pretrained(ckpts["math-shepherd"], fmt="math-shepherd")
    assert len(ms.score_steps(PROMPT, ["3+4=7 ки\n7-2=5"]).steps[0]) == 2  # the tag in a step is not a step end
    # past the verifier's context: a clear error, not a wrong score
    with pytest.raises(SettingError, match="past its context of 256"):
        prm.score_steps(PROMPT, ["\n\n".join(["1+1=2"] * 200)])
    # "+" and "-" must be one token each for the two-way formats
    import dataclasses

    from ponder.scoring.formats import PRESETS, Renderer

    two = dataclasses.replace(PRESETS["math-shepherd"], good="++")
    with pytest.raises(SettingError, match="must be exactly one token"):
        Renderer(two, ms.tokenizer)
