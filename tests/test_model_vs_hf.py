"""The native engine against transformers on the same weights: logits and greedy."""

from __future__ import annotations

import pytest
import torch

from ponder.decoding.generate import Greedy
from ponder.models.loader import load_tokenizer, load_transformer
from ponder.backends.native import NativeLM

NAMES = ["llama_gqa", "qwen2_bias", "llama_tied"]


BACKENDS = ["c", "numpy", "torch"]  # every implementation of a float32 pass is held to transformers


def _native(folder, dtype="float32", backend="auto"):
    return NativeLM(load_transformer(folder, dtype), load_tokenizer(folder), folder.name, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_full_forward_logits_match(hf_checkpoints, name, backend):
    folder, hf = hf_checkpoints[name]
    lm = _native(folder, backend=backend)
    torch.manual_seed(0)
    ids = torch.randint(1, lm.vocab_size, (3, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = lm.forward(ids, None)
    assert ref.abs().max() > 0.1  # the model is not degenerate
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_incremental_decoding_with_cache_matches(hf_checkpoints, name, backend):
    """Prompts of different lengths prefilled in one padded batch, then decoded one
    token at a time: every step's logits equal the full forward pass of transformers."""
    folder, hf = hf_checkpoints[name]
    lm = _native(folder, backend=backend)
    torch.manual_seed(1)
    lens = [5, 11, 8]
    seqs = [torch.randint(1, lm.vocab_size, (L + 6,)) for L in lens]
    logits, cache = lm.prefill([s[:L].tolist() for s, L in zip(seqs, lens)], capacity=8)
    for b, (s, L) in enumerate(zip(seqs, lens)):
        with torch.no_grad():
            ref = hf(s[None]).logits[0]
        assert (logits[b] - ref[L - 1]).abs().max().item() < 1e-4
    for t in range(6):
        tokens = torch.stack([s[L + t] for s, L in zip(seqs, lens)])
        logits = lm.step(tokens, cache)
        for b, (s, L) in enumerate(zip(seqs, lens)):
            with torch.no_grad():
                ref = hf(s[None]).logits[0, L + t]
            assert (logits[b] - ref).abs().max().item() < 1e-4


def test_bfloat16_loads_and_tracks_float32(hf_checkpoints):
    folder, _ = hf_checkpoints["llama_gqa"]
    lm32, lm16 = _native(folder), _native(folder, "bfloat16")
    assert lm16.model.dtype == torch.bfloat16
    ids = torch.randint(1, lm32.vocab_size, (2, 16))
    a, b = lm32.forward(ids, None), lm16.forward(ids, None)
    assert b.dtype == torch.float32  # logits are always handed out in float32
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


PROMPTS = [
    "Q: 1+2\n", "Q: 345-67+8\n", "Q: 9\n", "Q: 12-34+56-78+90\n", "Answer",
    "Q: 100+200\n100+", "-", "Q: 7-7-7-7-7-7-7-7\n", "Q: 55\n55", "Q: 999+1\n999+1=1000\n",
    "Q: 3+", "Q: 42-17+5\n42",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_generate(hf_checkpoints, name, backend):
    """12 prompts of different lengths, all in one ponder batch, against transformers
    generate(do_sample=False) run on each prompt alone."""
    folder, hf = hf_checkpoints[name]
    lm = _native(folder, backend=backend)
    outs = Greedy(lm, max_tokens=24).generate_batch(PROMPTS)
    assert len(outs) == len(PROMPTS)
    for prompt, (g,) in zip(PROMPTS, outs):
        ids = torch.tensor([lm.encode(prompt)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                          pad_token_id=0, eos_token_id=0)[0, ids.shape[1]:].tolist()
        assert g.token_ids == ref[: len(g.token_ids)]
        if g.finish_reason == "stop":  # EOS; transformers pads the rest with EOS (= pad here)
            assert g.token_ids[-1] == 0 and all(t == 0 for t in ref[len(g.token_ids):])
        else:
            assert len(g.token_ids) == 24


@pytest.mark.parametrize("backend", ["c", "numpy"])
def test_fast_backends_agree_with_torch_on_mixed_steps(hf_checkpoints, backend):
    """Multi-token steps on rows of different lengths (what speculative verification
    and prefix-cache completions run), with padding and rollback, against the torch model."""
    folder, _ = hf_checkpoints["qwen2_bias"]
    a, b = _native(folder, backend=backend), _native(folder, backend="torch")
    torch.manual_seed(3)
    prompts = [torch.randint(1, a.vocab_size, (n,)).tolist() for n in (3, 9, 6)]
    la, ca = a.prefill(prompts)
    lb, cb = b.prefill(prompts)
    assert (la - lb).abs().max().item() < 1e-4
    for _ in range(3):
        ids = torch.randint(1, a.vocab_size, (3, 4))
        num_new = torch.tensor([4, 2, 3])
        xa, xb = a.forward(ids, ca, num_new), b.forward(ids, cb, num_new)
        for r, n in enumerate(num_new.tolist()):
            assert (xa[r, :n] - xb[r, :n]).abs().max().item() < 1e-4
        assert ca.lengths.tolist() == cb.lengths.tolist()
    ca.truncate_(torch.tensor([1, 0, 2]))
    cb.truncate_(torch.tensor([1, 0, 2]))
    tok = torch.tensor([5, 6, 7])
    assert (a.step(tok, ca) - b.step(tok, cb)).abs().max().item() < 1e-4
    ca.reorder_([2, 2, 0])  # forked rows (index_select copies) keep working
    cb.reorder_([2, 2, 0])
    assert (a.step(tok, ca) - b.step(tok, cb)).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        a.forward(torch.tensor([[a.vocab_size]]), None)


@pytest.mark.parametrize("name", ["qwen2_bias", "llama_gqa"])
def test_c_kernel_rows_do_not_depend_on_their_batch(hf_checkpoints, name):
    """Every output of the packed matrix products is one sum in a fixed order, whatever
    the tile or thread: a row's logits are the same bits alone, among 13 rows (tiles of
    6, 6 and 1) on one thread or two, among 4, 8, 10 or 16 rows (a 5-row tile with a
    repeated fourth row; 5 + 3; 5 + 5; 6 + 5 + 5), and in a 4-token pass (speculative
    verification) as in 4 single steps."""
    folder, _ = hf_checkpoints[name]
    lm = _native(folder, backend="c")
    torch.manual_seed(11)
    prompts = [torch.randint(1, lm.vocab_size, (n,)).tolist() for n in range(3, 16)]
    batch_logits, batch_cache = lm.prefill(prompts)
    tokens = torch.randint(1, lm.vocab_size, (len(prompts),))
    threads = torch.get_num_threads()
    try:  # the same pass on one thread and on two (OpenMP build): the same bits
        torch.set_num_threads(1)
        one_thread = lm.step(tokens, batch_cache.fork(list(range(len(prompts)))))
        torch.set_num_threads(2)
        batch_step = lm.step(tokens, batch_cache)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, batch_step)
    alone = []
    for i, p in enumerate(prompts):
        alone_logits, alone_cache = lm.prefill([p])
        assert torch.equal(alone_logits[0], batch_logits[i])
        alone.append(lm.step(tokens[i : i + 1], alone_cache)[0])
        assert torch.equal(alone[i], batch_step[i])
    for rows in (4, 8, 10, 16):
        picks = [i % len(prompts) for i in range(rows)]
        _, cache = lm.prefill([prompts[i] for i in picks])
        step = lm.step(tokens[picks], cache)
        for j, i in enumerate(picks):
            assert torch.equal(step[j], alone[i]), (rows, j)
    _, c1 = lm.prefill([prompts[0]])
    _, c4 = lm.prefill([prompts[0]])
    feed = torch.randint(1, lm.vocab_size, (1, 4))
    together = lm.forward(feed, c4)[0]
    for t in range(4):
        assert torch.equal(lm.step(feed[:, t], c1)[0], together[t])


def test_c_kernel_repacks_weights_changed_in_place(hf_checkpoints):
    """The kernel reads a packed copy of the matrices: a weight changed in place (a
    training step, load_state_dict) must be seen by the next pass."""
    folder, _ = hf_checkpoints["llama_tied"]
    a, b = _native(folder, backend="c"), _native(folder, backend="torch")
    ids = torch.tensor([[3, 9, 4, 7]])
    assert (a.forward(ids, None) - b.forward(ids, None)).abs().max().item() < 1e-4
    with torch.no_grad():
        for lm in (a, b):
            lm.model.layers[0].mlp.down_proj.weight.mul_(-2.0)
            lm.model.embed_tokens.weight[5].add_(0.5)  # tied: the output head changes too
    assert (a.forward(ids, None) - b.forward(ids, None)).abs().max().item() < 1e-4


def test_c_kernel_reads_shared_prefixes_like_the_torch_model(hf_checkpoints):
    """Cascade attention (a prompt's KV kept once for the rows forked from it): the C
    kernel against the torch model's shared_prefix_attention, on ragged rows."""
    folder, _ = hf_checkpoints["qwen2_bias"]
    a, b = _native(folder, backend="c"), _native(folder, backend="torch")
    torch.manual_seed(5)
    prompts = [torch.randint(1, a.vocab_size, (n,)).tolist() for n in (12, 7)]
    caches = []
    for lm in (a, b):
        _, c = lm.prefill(prompts)
        c.share_rows_([0])  # prompt 0 becomes a shared prefix; prompt 1 keeps its own slots
        caches.append(c.fork([0, 0, 1, 0]))
    for step in range(4):
        tok = torch.randint(1, a.vocab_size, (4,))
        la, lb = a.step(tok, caches[0]), b.step(tok, caches[1])
        assert (la - lb).abs().max().item() < 1e-4
        if step == 1:
            for c in caches:
                c.reorder_([1, 1, 2, 3])  # rows fork again mid-way
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist()


def test_auto_backend_is_c_and_falls_back_to_numpy_without_a_compiler(hf_checkpoints, tmp_path):
    import subprocess
    import sys

    folder, _ = hf_checkpoints["llama_gqa"]
    assert _native(folder).backend_in_use == "c"
    # the kernel was compiled with fast-math but must not flush denormals process-wide
    assert torch.tensor([1e-40]).item() != 0.0
    assert _native(folder, backend="torch").backend_in_use == "torch"
    assert _native(folder, "bfloat16").backend_in_use == "torch"
    code = ("from ponder.backends.native import NativeLM\nfrom ponder.models.loader import *\n"
            f"lm = NativeLM(load_transformer({str(folder)!r}), load_tokenizer({str(folder)!r}))\n"
            "print(lm.backend_in_use)\n"
            "from ponder.models.kernel import kernel_error\nprint(kernel_error())")
    env = {**__import__("os").environ, "CC": str(tmp_path / "no-such-compiler"), "PONDER_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "numpy"
    assert "failed" in out.splitlines()[1]


def test_backend_is_validated(hf_checkpoints):
    folder, _ = hf_checkpoints["llama_gqa"]
    with pytest.raises(ValueError, match="backend must be one of auto, c, numpy, torch"):
        _native(folder, backend="fast")
    lm16 = _native(folder, "bfloat16", backend="numpy")
    with pytest.raises(ValueError, match="float32"):
        lm16.forward(torch.tensor([[1, 2]]), None)


def test_checkpoint_errors_are_clear(tmp_path):
    from ponder.models.loader import CheckpointError

    with pytest.raises(CheckpointError, match="config.json"):
        load_transformer(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, '
                                          '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}')
    with pytest.raises(ValueError, match="not supported"):
        load_transformer(tmp_path)


def test_greedy_matches_transformers_on_the_shipped_model(arith_lm):
    from transformers import AutoModelForCausalLM

    from ponder.tasks.arith import ArithTask

    hf = AutoModelForCausalLM.from_pretrained(arith_lm.path).eval()
    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("medium", limit=6) + task.problems("hard", limit=6)]
    outs = Greedy(arith_lm, max_tokens=100).generate_batch(prompts)
    eos = arith_lm.eos_token_ids[0]
    for prompt, (g,) in zip(prompts, outs):
        ids = torch.tensor([arith_lm.encode(prompt)])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=100,
                          pad_token_id=eos, eos_token_id=eos)[0, ids.shape[1]:].tolist()
        assert g.token_ids == ref[: len(g.token_ids)]
        assert g.finish_reason == "stop" and all(t == eos for t in ref[len(g.token_ids):])


def test_c_kernel_shares_torchs_openmp_runtime(arith_lm):
    """Where torch runs on GNU OpenMP, the kernel is built against that very library:
    one runtime (one pool of threads) in the process, and passes can use it."""
    from pathlib import Path

    from ponder.models.kernel import torch_openmp

    if torch_openmp() is None:
        pytest.skip("torch does not use GNU OpenMP here")
    fast = arith_lm._fast_for(None)
    assert fast.kind == "c" and fast.parallel
    loaded = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "/libgomp" in line}
    assert len(loaded) == 1, loaded
    assert fast.threads_for(1) == torch.get_num_threads()  # arith's one-row step is 1.7M multiply-adds


def test_c_kernel_wide_matrices_match_torch():
    """A down projection 1100 wide: the kernel walks its output panels in groups of 3
    (sized to L2), the last group partial; logits still match the torch model's."""
    from ponder.models.llama import Transformer
    from ponder.models.registry import resolve_model
    from ponder.train.common import init_weights as _init_weights, make_config

    path, _ = resolve_model("arith")
    tok = load_tokenizer(path)
    torch.manual_seed(7)
    model = Transformer(make_config(tok, hidden=64, layers=1, heads=4, kv_heads=2, ffn=1100))
    _init_weights(model)
    c, t = NativeLM(model, tok, backend="c"), NativeLM(model, tok, backend="torch")
    ids = torch.randint(1, c.vocab_size, (13, 5))
    assert (c.forward(ids, None) - t.forward(ids, None)).abs().max().item() < 1e-4


def test_c_kernel_bfloat16_matrices_compute_the_rounded_model():
    """A drafting copy with bfloat16 matrices computes the model whose layer matrices
    are rounded to bfloat16 (sums in float32, embedding and head unrounded); a weight
    type outside float32/bfloat16 is refused."""
    import copy

    from ponder.models.llama_c import CLlama, load_kernel

    lib = load_kernel()
    if lib is None:
        pytest.skip("no C compiler")
    lm = NativeLM.from_pretrained("arith")
    rounded = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and name.startswith("layers."):
                p.copy_(p.to(torch.bfloat16).float())
    ids = torch.tensor([lm.encode("Q: 3+4-2+8-1\n3+4=7\n")] * 3)
    want = NativeLM(rounded, lm.tokenizer, "rounded", backend="torch").forward(ids, None)
    twin = CLlama(lm.model, lib, weights="bfloat16")
    assert str(twin._packed[0].dtype) == "uint16"
    got = twin.run_torch(ids, None)
    assert (got - want).abs().max().item() < 1e-4
    full = lm.forward(ids, None)
    assert (full - want).abs().max().item() > 1e-4  # the rounding is real: float32 differs
    with pytest.raises(ValueError, match="weights must be one of float32, bfloat16"):
        CLlama(lm.model, lib, weights="float16")


@pytest.mark.parametrize("march,isa", [("x86-64", 0), ("haswell", 3)])
def test_kernel_builds_for_older_cpus_match_torch(tmp_path, march, isa):
    """The kernel's portable path (plain x86-64: no AVX2/FMA) and its 256-bit path
    (haswell: no AVX-512) against torch, float32 and the bfloat16 drafting copy (a
    machine with AVX-512 builds neither by itself)."""
    import platform

    from ponder.models.kernel import cpu_flags

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    if isa and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA")
    code = """
import copy, sys, torch
from ponder.models.kernel import load_kernel, kernel_error
from ponder.models.llama_c import CLlama
from ponder.backends.native import NativeLM
lib = load_kernel()
assert lib is not None, kernel_error()
assert lib.ponder_isa() == int(sys.argv[1]), lib.ponder_isa()
c = NativeLM.from_pretrained("arith", backend="c")
t = NativeLM(c.model, c.tokenizer, "arith", backend="torch")
ids = torch.tensor([c.encode("Q: 3+4-2+8-1\\n3+4=7\\n")] * 7)
d = (c.forward(ids, None) - t.forward(ids, None)).abs().max().item()
assert d < 1e-4, d
from ponder.decoding.generate import Greedy
assert Greedy(c, max_tokens=40).generate("Q: 9-8+7\\n")[0].token_ids == Greedy(t, max_tokens=40).generate("Q: 9-8+7\\n")[0].token_ids
rounded = copy.deepcopy(c.model)
with torch.no_grad():
    for name, p in rounded.named_parameters():
        if p.dim() == 2 and name.startswith("layers."):
            p.copy_(p.to(torch.bfloat16).float())
want = NativeLM(rounded, c.tokenizer, "r", backend="torch").forward(ids, None)
b = (CLlama(c.model, lib, weights="bfloat16").run_torch(ids, None) - want).abs().max().item()
assert b < 1e-4, b
print("ok", d, b)
"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PONDER_KERNEL_MARCH": march, "PONDER_CACHE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code, str(isa)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


def test_a_cached_kernel_the_cpu_cannot_run_is_refused(tmp_path, monkeypatch):
    from ponder.models import kernel

    assert kernel.missing_features(3, {"avx2", "fma", "sse2"}) == []
    assert kernel.missing_features(3, {"avx2", "sse2"}) == ["fma"]
    assert kernel.missing_features(5, {"avx2", "fma"}) == ["avx512f"]
    lib = kernel.load_kernel()
    if lib is None or lib.ponder_isa() == 0:
        pytest.skip("no vector build here")
    # the same build, seen from a host without AVX2: refused before any call into it
    monkeypatch.setenv("PONDER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel, "_kernel", None)
    monkeypatch.setattr(kernel, "_kernel_error", None)
    monkeypatch.setattr(kernel, "_cpu_id", lambda cc: "a host with the same model name")
    real = kernel.cpu_flags()
    monkeypatch.setattr(kernel, "cpu_flags", lambda: real - {"avx2", "fma", "avx512f"})
    assert kernel.load_kernel() is None
    assert "lacks" in kernel.kernel_error()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory, tokenizer_file):
    """A tiny Qwen3: q/k RMSNorm per head, no QKV bias, head_dim 32 (not hidden/heads)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from conftest import TINY, _save

    torch.manual_seed(3)
    from tokenizers import Tokenizer

    cfg = Qwen3Config(vocab_size=Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(), num_key_value_heads=2,
                      head_dim=32, tie_word_embeddings=False, **TINY)
    hf = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.2 if n.endswith("norm.weight") else 0.08)
    return _save(hf, tmp_path_factory.mktemp("qwen3") / "qwen3", tokenizer_file), hf


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen3_logits_and_greedy_equal_transformers(qwen3, backend):
    folder, hf = qwen3
    lm = _native(folder, backend=backend)
    assert lm.model.cfg.qk_norm and not lm.model.cfg.qkv_bias
    assert lm.backend_in_use == backend  # the C kernel and numpy run Qwen3 themselves (no fallback to torch)
    torch.manual_seed(0)
    ids = torch.randint(1, lm.vocab_size, (2, 30))
    with torch.no_grad():
        ref = hf(ids).logits
    ours = lm.forward(ids, None)
    assert ref.abs().max() > 0.1 and (ours - ref).abs().max().item() < 1e-5
    prompt = lm.decode(list(range(5, 20)))
    g = Greedy(lm, max_tokens=16, ignore_eos=True).generate(prompt)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([lm.encode(prompt)]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           pad_token_id=0)[0, len(lm.encode(prompt)):].tolist()
    assert g.token_ids == want
