"""Shared fixtures: tiny random checkpoints built and saved by transformers (the oracle).

tests/e2e/ holds the end-to-end tests (real servers on loopback, Chromium); they import
this folder's helpers (servers.py, browser.py, viewing.py), which pytest puts on the path with this file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    from ponder.train.common import build_tokenizer, corpus

    d = tmp_path_factory.mktemp("tok")
    tok = build_tokenizer(corpus(2000, seed=3))
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def _save(model, folder: Path, tokenizer_file: Path) -> Path:
    import shutil

    model.save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    return folder


TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=0, eos_token_id=0, pad_token_id=0, max_position_embeddings=512)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory, tokenizer_file):
    """name -> (folder, transformers model). Random weights, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from ponder.train.common import load_tok as _load_tok

    vocab = _load_tok(str(tokenizer_file)).get_vocab_size()
    out = {}
    specs = {
        # grouped-query attention + Llama-3 rope scaling, untied embeddings
        "llama_gqa": (LlamaForCausalLM, LlamaConfig(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False,
                      rope_theta=50000.0, rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **TINY)),
        # Qwen2: q/k/v bias, tied embeddings
        "qwen2_bias": (Qwen2ForCausalLM, Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=True, **TINY)),
        # plain multi-head Llama with tied embeddings
        "llama_tied": (LlamaForCausalLM, LlamaConfig(vocab_size=vocab, num_key_value_heads=4, tie_word_embeddings=True, **TINY)),
    }
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        m = cls(cfg).eval()
        # Larger-than-default init so that the random models have peaked, varied outputs.
        with torch.no_grad():
            for n_, p in m.named_parameters():
                if p.dim() == 2 or n_.endswith("bias"):
                    p.normal_(0, 0.1)
        out[name] = (_save(m, tmp_path_factory.mktemp(name), tokenizer_file), m)
    return out


@pytest.fixture(scope="session")
def arith_lm():
    from ponder.backends.native import NativeLM

    return NativeLM.from_pretrained("arith")


# -- `ponder view` in Chromium (tests/e2e/test_view*.py): one sweep store, its server and
# one browser a session; helpers in viewing.py and browser.py, imported when first used
@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    from viewing import TWO_MODELS, ponder_cli

    folder = tmp_path_factory.mktemp("view")
    (folder / "sweep.toml").write_text(TWO_MODELS)
    db = folder / "results.sqlite"
    r = ponder_cli("sweep", str(folder / "sweep.toml"), "--db", str(db), "--report", "")
    assert r.returncode == 0, r.stderr
    return db


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("PONDER_ARTIFACTS") or tmp_path_factory.mktemp("view-shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="session")
def server(store):
    from browser import served

    with served(store) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from browser import available, chromium

    if not available():
        pytest.fail("these tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    d = chromium()
    yield d
    d.quit()
