"""Architecture features read from config.json, held to transformers: SmolLM3's NoPE
layers and sliding-window attention (Mistral, Qwen2)."""

from __future__ import annotations

import pytest
import torch

from ponder.decoding.generate import Greedy
from ponder.errors import SettingError
from ponder.models.config import ModelConfig
from ponder.backends.native import NativeLM

from conftest import TINY, _save


def _random(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    with torch.no_grad():
        for n_, p in m.named_parameters():
            if p.dim() == 2 or n_.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def _vocab(tokenizer_file):
    from ponder.train.common import load_tok

    return load_tok(str(tokenizer_file)).get_vocab_size()


def test_smollm3_nope_layers_match_transformers(tmp_path, tokenizer_file):
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tiny = {**TINY, "num_hidden_layers": 4}
    cfg = SmolLM3Config(vocab_size=_vocab(tokenizer_file), num_key_value_heads=2, **tiny)  # layer 3 has no RoPE
    hf = _random(SmolLM3ForCausalLM, cfg, 7)
    folder = _save(hf, tmp_path / "smol", tokenizer_file)
    lm = NativeLM.from_pretrained(str(folder))
    assert lm.cfg.rope_layers == (True, True, True, False)
    ids = torch.tensor([[0] + list(range(5, 45))])
    with torch.no_grad():
        want = hf(ids).logits[0]
    got = lm.forward(ids, None)[0]
    assert (got - want).abs().max() < 1e-4
    prompt = lm.decode(list(range(5, 25)))
    g = Greedy(lm, max_tokens=20, ignore_eos=True).generate(prompt)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([lm.encode(prompt)]), max_new_tokens=20, do_sample=False,
                          min_new_tokens=20, pad_token_id=0)[0, len(lm.encode(prompt)):].tolist()
    assert g.token_ids == ref


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_scoring_past_a_sliding_window_is_refused_by_name(tmp_path, tokenizer_file, arch):
    """Within the window, prompt scoring equals transformers; past it, score, score_ids and the
    raw forward refuse, naming the window (16), not max_position_embeddings (512)."""
    import asyncio

    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch == "mistral":
        cls, cfg = MistralForCausalLM, MistralConfig(vocab_size=_vocab(tokenizer_file), num_key_value_heads=2,
                                                     sliding_window=16, **TINY)
    else:
        cls, cfg = Qwen2ForCausalLM, Qwen2Config(vocab_size=_vocab(tokenizer_file), num_key_value_heads=2,
                                                 use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                                 **TINY)
    hf = _random(cls, cfg, 9)
    lm = NativeLM.from_pretrained(str(_save(hf, tmp_path / arch, tokenizer_file)))
    assert lm.context_length == 16 and lm.context_limit == "sliding_window"
    ids = [0] + list(range(5, 20))  # 16 tokens: exactly the window
    got = lm.score_ids(ids[:4], ids[4:])
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    ref = [float(want[i - 1, t]) for i, t in enumerate(ids) if i >= 4]
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
    longer = ids + [21, 22]
    for call in (lambda: lm.score_ids(longer[:4], longer[4:]),
                 lambda: asyncio.run(lm.score(lm.decode(longer[1:4]), [lm.decode(longer[4:])])),
                 lambda: lm.forward(torch.tensor([longer]), None)):
        with pytest.raises(SettingError, match=r"context of 16 \(sliding_window\)"):
            call()
    with pytest.raises(SettingError, match=r"context of 16 \(sliding_window\)"):
        Greedy(lm, max_tokens=4).generate(list(range(5, 65)))


def test_sliding_window_caps_the_context_at_the_window(tmp_path, tokenizer_file):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=_vocab(tokenizer_file), num_key_value_heads=2, sliding_window=16, **TINY)
    hf = _random(MistralForCausalLM, cfg, 8)
    folder = _save(hf, tmp_path / "mistral", tokenizer_file)
    lm = NativeLM.from_pretrained(str(folder))
    assert lm.context_length == 16
    with pytest.raises(SettingError, match="context of 16"):
        Greedy(lm, max_tokens=4).generate(list(range(5, 65)))  # 60 tokens: past the window
    prompt = [0] + list(range(5, 15))  # 11 tokens: 5 more fit the window
    g = Greedy(lm, max_tokens=100, ignore_eos=True).generate(prompt)[0]
    assert g.finish_reason == "length" and len(g.token_ids) == 5
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert g.token_ids == ref


@pytest.mark.parametrize("d, window", [
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}, 32),
    ({"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 32}, None),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2}, None),
    ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "llama", "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8}, 8),
])
def test_sliding_window_read_per_layer_as_transformers_does(d, window):
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 512}
    cfg = ModelConfig.from_dict({**base, **d})
    assert cfg.sliding_window == window
    assert cfg.context_length == (window or 512)
