"""Chat templates rendered client-side: the same text as transformers'
``apply_chat_template`` (the oracle), and ``--chat-template`` turning a task's prompts
into user messages whose assistant turn the algorithms continue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ponder.backends.chat import ChatTemplate
from ponder.errors import SettingError
from ponder.models.registry import resolve_model
from ponder.tasks.arith import ArithTask
from ponder.tasks.base import FormattedTask

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MESSAGES = [
    [{"role": "user", "content": "Q: 3+4-2\n"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 1+1\n"}],
    [{"role": "user", "content": "Q: 3+4-2\n"}, {"role": "assistant", "content": "3+4=7\n"}],
]


@pytest.fixture()
def chat_folder(tmp_path):
    """The shipped arith with a ChatML template in its tokenizer_config.json."""
    src, _ = resolve_model("arith")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "</s>"}))
    return tmp_path


@pytest.mark.parametrize("source", [CHATML, LLAMA3])
def test_rendering_equals_transformers(source):
    from transformers import PreTrainedTokenizerFast

    path, _ = resolve_model("arith")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>")
    tok.chat_template = source
    mine = ChatTemplate(source, {"bos_token": "<s>"})
    for msgs in MESSAGES:
        cont = msgs[-1]["role"] == "assistant"
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=not cont,
                                       continue_final_message=cont)
        assert mine.render(msgs, add_generation_prompt=not cont) == want


def test_a_task_prompt_becomes_a_user_message_the_steps_continue(chat_folder):
    tpl = ChatTemplate.load("auto", SimpleNamespace(path=str(chat_folder), name="m"))
    task = FormattedTask(ArithTask(), tpl.prompt_for)
    (p,) = task.problems("easy", 1)
    prompt = task.prompt(p)
    assert prompt == f"<|im_start|>user\n{ArithTask().prompt(p)}<|im_end|>\n<|im_start|>assistant\n"
    # a step-level search appends its steps to this text: the assistant turn, continued
    assert tpl.render([{"role": "user", "content": ArithTask().prompt(p)}, {"role": "assistant", "content": "1+2=3\n"}],
                      add_generation_prompt=False) == prompt + "1+2=3\n"
    # answers are still the task's
    assert task.check_answer(p, f"Answer: {p.answer}\n") and task.name == "arith"


def test_a_remote_model_finds_its_template_in_its_tokenizer_folder(chat_folder):
    from ponder.backends.openai import OpenAILM

    lm = OpenAILM.__new__(OpenAILM)  # the folder logic only (no server needed for it)
    lm.name, lm.tokenizer_folder = "m", str(chat_folder)
    assert ChatTemplate.load("auto", lm).source == CHATML


def test_bad_chat_templates_say_what_to_give(tmp_path, chat_folder):
    with pytest.raises(SettingError, match="no local folder"):
        ChatTemplate.load("auto", SimpleNamespace(name="remote"))
    with pytest.raises(SettingError, match="does not exist"):
        ChatTemplate.load(str(tmp_path / "nope.jinja"))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(SettingError, match="holds no chat_template"):
        ChatTemplate.load(str(tmp_path))
    (tmp_path / "bad.jinja").write_text("{% for %}")
    with pytest.raises(SettingError, match="does not compile"):
        ChatTemplate.load(str(tmp_path / "bad.jinja"))
    path, _ = resolve_model("arith")
    with pytest.raises(SettingError, match="holds no chat_template|does not exist"):
        ChatTemplate.load("auto", SimpleNamespace(path=str(path), name="arith"))


def test_cli_renders_the_prompt(chat_folder, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML)
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "generate", "-m", str(chat_folder), "--chat-template",
                          str(tpl), "--max-tokens", "4", "--json", "Q: 1+2\n"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == "<|im_start|>user\nQ: 1+2\n<|im_end|>\n<|im_start|>assistant\n"
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "eval", "-m", str(chat_folder), "--chat-template", "auto",
                          "--limit", "3", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["problems"] == 3
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "eval", "-m", "arith", "--chat-template", "auto",
                          "--limit", "3"], capture_output=True, text=True)
    assert out.returncode != 0 and "chat_template" in out.stderr or "does not exist" in out.stderr


def test_a_folder_saved_by_transformers_gives_its_chat_template_jinja(tmp_path):
    """transformers 5 saves the template as chat_template.jinja beside tokenizer_config.json:
    `--chat-template auto` reads it (and a .jinja file there wins, as in transformers)."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ponder.backends.native import NativeLM

    path, _ = resolve_model("arith")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    if not (tmp_path / "chat_template.jinja").is_file():  # an older transformers keeps it in the json
        pytest.skip("this transformers saves the template inside tokenizer_config.json")
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    lm = NativeLM.from_pretrained(str(tmp_path))
    tpl = ChatTemplate.load("auto", lm)
    for msgs in MESSAGES[:2]:
        assert tpl.render(msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ChatTemplate.load(str(tmp_path)).source == CHATML
    assert ChatTemplate.load(str(tmp_path / "chat_template.jinja")).source == CHATML
