"""``CLlama``: the forward pass of ``llama_numpy.NumpyLlama``, logits included, run by
``llama_kernel.c``.

The C file is compiled with the system's C compiler (``cc``, or ``$CC``) on first use
and cached under ``$PONDER_CACHE_DIR`` (default ``~/.cache/ponder``), keyed by the
source, the flags and the processor, so later processes load it in a millisecond.
Without a compiler ``load_kernel()`` returns None and ``NativeLM`` uses numpy: the C
path is an accelerator, never a requirement. ``PONDER_NO_C=1`` turns it off.

One call runs every layer of a pass (~160 numpy operations per decode step on the
shipped model), so a step costs its memory traffic plus one ctypes call. The kernel
reads the matrices as a packed copy (``pack_panels``), remade when a weight changes in
place. Where torch runs on GNU OpenMP the kernel is built against that same runtime,
and a large enough pass (``CLlama.PARALLEL_MIN_MACS``) runs on torch's thread count.
"""

from __future__ import annotations

import ctypes
import operator

import numpy as np
import torch

from . import WEIGHT_TYPES
from .kernel import cpu_summary, kernel_error, load_kernel  # noqa: F401  (the kernel this model runs)
from .kv_cache import KVCache
from .llama import Transformer
from .llama_numpy import NumpyLlama

_VERSION = operator.attrgetter("_version")
_LAYER_FIELDS = ("ln1", "wqkv", "bqkv", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd", "qn", "kn")
_MATRICES = ("wqkv", "wo", "wgu", "wd")
PANEL = 16  # output columns per packed panel (NR in llama_kernel.c)


def pack_panels(w: np.ndarray, bfloat16: bool = False) -> np.ndarray:
    """W [out, in] as the kernel reads it: panels of PANEL output columns, [ceil(out /
    PANEL), in, PANEL], the last panel zero-padded. A panel is then one contiguous run
    that a tile of rows streams through once. ``bfloat16``: each weight rounded to
    bfloat16 (to nearest, ties to even, as torch rounds), stored as uint16."""
    out, inn = w.shape
    n = -(-out // PANEL)
    a = np.zeros((n * PANEL, inn), np.float32)
    a[:out] = w
    a = np.ascontiguousarray(a.reshape(n, PANEL, inn).transpose(0, 2, 1))
    if bfloat16:
        a = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return a


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "layers", "vocab")] + [
        ("eps", ctypes.c_float), ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p)] + [
        (n, ctypes.POINTER(ctypes.c_void_p)) for n in _LAYER_FIELDS] + [("bf16", ctypes.c_int)]


def _ptr(a: np.ndarray | None) -> int | None:
    if a is None:
        return None
    if not a.flags.c_contiguous or a.dtype != np.float32:
        raise ValueError("the C kernel needs contiguous float32 weights")
    return a.ctypes.data


class _PairArgs:
    """A two-model call's arguments (see ``CLlama._pair_args``); ``finish`` checks the
    call's status and moves both caches' lengths to where the kernel left them."""

    def __init__(self, ids_t: np.ndarray, ids_d: np.ndarray, t_start: np.ndarray, d_start: np.ndarray,
                 vocab: int) -> None:
        self.ids_t, self.ids_d, self.t_start, self.d_start, self.vocab = ids_t, ids_d, t_start, d_start, vocab
        self.target: tuple = ()
        self.draft: tuple = ()

    def finish(self, status: int, tcache: KVCache, dcache: KVCache) -> None:
        if status == -2:
            raise ValueError(f"token ids must be in [0, {self.vocab}); got {self.ids_t.tolist()} and {self.ids_d.tolist()}")
        if status < 0:
            raise MemoryError("the C kernel could not allocate its scratch memory")
        tcache.lengths, dcache.lengths = torch.from_numpy(self.t_start), torch.from_numpy(self.d_start)


class CLlama(NumpyLlama):
    """``NumpyLlama`` whose ``run_torch`` (what ``NativeLM`` calls) is one call into the C
    kernel, logits included, and which runs whole greedy drafting and speculative rounds
    there too. Build it only when ``load_kernel()`` is not None."""

    kind = "c"
    handles_shared_prefix = True
    # A pass of at least this many multiply-adds (token rows x parameters) runs on
    # torch's threads (torch.get_num_threads(), through the same OpenMP runtime); below
    # it, the threads' ~25 meeting points per pass cost more than they save. Measured
    # on 2 cores: a 1-token step of the 1.7M-parameter arith model 0.200 -> 0.144 ms,
    # of the 0.3M-parameter draft 0.109 -> 0.112 ms. The split changes no bit.
    PARALLEL_MIN_MACS = 1_000_000

    WEIGHTS = WEIGHT_TYPES

    def __init__(self, model: Transformer, lib: ctypes.CDLL, weights: str = "float32") -> None:
        """``weights``: the packed matrices' type. "bfloat16" halves their bytes (the
        head, norms and embedding stay float32, and so does every sum): a speculative
        draft's copy, whose numbers decide only which drafts are accepted."""
        if weights not in self.WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(self.WEIGHTS)}; got {weights!r}")
        super().__init__(model)
        self.lib = lib
        self.weights = weights
        self._pack()
        self.parallel = bool(lib.ponder_openmp())  # built with OpenMP
        self._macs_per_row = self.cfg.num_parameters()  # multiply-adds per token row, near enough
        # (cos, sin, their data pointers) of the rotary table in use, replaced as one
        # tuple when the table grows: a call holds its tuple, so a table another thread
        # replaces mid-call stays alive until the call ends
        self._rope_state: tuple | None = None

    def _weights_version(self) -> int:
        """Changes whenever a weight is modified in place (training, load_state_dict)."""
        return sum(map(_VERSION, self._tensors))  # 2.1 us for 26 tensors (a generator: 2.6)

    def _pack(self) -> None:
        """Point the kernel's model struct at the weights: the numpy views NumpyLlama
        holds for norms, biases and the embedding, packed copies of the matrices."""
        cfg = self.cfg
        per_layer: dict[str, list] = {n: [] for n in _LAYER_FIELDS}
        keep: list[np.ndarray] = []  # the packed copies, alive as long as the struct
        for arrays in self.layers:  # in _LAYER_FIELDS order, the matrices as W.T views
            for n, a in zip(_LAYER_FIELDS, arrays):
                if n in _MATRICES:
                    keep.append(pack_panels(a.T, self.weights == "bfloat16"))
                    per_layer[n].append(keep[-1].ctypes.data)
                else:
                    per_layer[n].append(_ptr(a))
        head, bias = (self.score[0].T, self.score[1]) if self.score is not None else (self.head.T, None)
        keep.append(pack_panels(head))
        self._head_ptrs = (keep[-1].ctypes.data, _ptr(bias), head.shape[0])
        self._arrays = {n: (ctypes.c_void_p * len(v))(*v) for n, v in per_layer.items()}
        self._struct = _Model(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.rms_norm_eps,
                              _ptr(self.embed), _ptr(self.norm),
                              *(ctypes.cast(self._arrays[n], ctypes.POINTER(ctypes.c_void_p)) for n in _LAYER_FIELDS),
                              int(self.weights == "bfloat16"))
        self._struct_ptr = ctypes.addressof(self._struct)
        self._packed, self._tensors = keep, list(self.model.parameters())
        self._packed_version = self._weights_version()

    def _fresh(self) -> None:
        """Repack if a weight changed since the last packing (the copies would be stale)."""
        if self._weights_version() != self._packed_version:
            self._pack()

    @staticmethod
    def _pointers(cache: KVCache) -> tuple[ctypes.Array, ctypes.Array]:
        """Per-layer K and V data pointers, kept on the cache until it swaps its tensors."""
        v = getattr(cache, "_c_pointers", None)
        if v is None or v[0] is not cache.k[0] or v[1] is not cache.v[0]:
            for t in cache.k + cache.v:
                if not t.is_contiguous():
                    raise ValueError("the C kernel needs a contiguous KV cache")
            L = len(cache.k)
            v = (cache.k[0], cache.v[0], (ctypes.c_void_p * L)(*[t.data_ptr() for t in cache.k]),
                 (ctypes.c_void_p * L)(*[t.data_ptr() for t in cache.v]))
            cache._c_pointers = v
        return v[2], v[3]

    def _rope_table(self, n: int) -> tuple:
        """(cos, sin, cos pointer, sin pointer) covering positions < n."""
        state = self._rope_state
        if state is None or state[0].shape[0] < n:
            cos, sin = self._rope(n)
            state = self._rope_state = (cos, sin, cos.ctypes.data, sin.ctypes.data)
        return state

    @staticmethod
    def _shared_pointers(cache: KVCache):
        """Per row and layer, the K and V data pointers of the shared prefix the row reads
        (cascade layout, see KVCache.share_rows_), and each row's prefix length; all
        None when no row reads one. Kept on the cache until its groups change."""
        v = getattr(cache, "_c_shared", None)
        if v is None or v[0] is not cache.group or v[1] is not cache.shared or len(v[2]) != len(cache.shared):
            groups = cache.group.tolist()
            if all(g < 0 for g in groups):
                arrays = (None, None, None)
            else:
                L = len(cache.k)
                pk, pv = [], []
                for g in groups:
                    for layer in range(L):
                        for out, t in ((pk, cache.shared[g][0][layer] if g >= 0 else None),
                                       (pv, cache.shared[g][1][layer] if g >= 0 else None)):
                            if t is not None and not t.is_contiguous():
                                raise ValueError("the C kernel needs contiguous shared-prefix KV")
                            out.append(None if t is None else t.data_ptr())
                plen = np.ascontiguousarray(cache.base.numpy(), dtype=np.int64)
                arrays = ((ctypes.c_void_p * len(pk))(*pk), (ctypes.c_void_p * len(pv))(*pv), plen)
            v = (cache.group, cache.shared, list(cache.shared), arrays)
            cache._c_shared = v
        return v[3]

    def threads_for(self, rows: int) -> int:
        """Threads for a pass over ``rows`` token rows: torch's count
        (``torch.get_num_threads()``) from PARALLEL_MIN_MACS on, else one."""
        if not self.parallel or rows * self._macs_per_row < self.PARALLEL_MIN_MACS:
            return 1
        return torch.get_num_threads()

    def _call(self, input_ids: torch.Tensor, cache: KVCache, logits: torch.Tensor, sel: torch.Tensor | None
              ) -> np.ndarray:
        """Run the kernel over ``cache``, writing ``logits``; returns the rows' former lengths."""
        self._fresh()
        B, T = input_ids.shape
        ids = input_ids.contiguous().long()
        lengths = cache.lengths.contiguous()
        start = lengths.numpy()
        hi = int(start[0]) if B == 1 else int(start.max())
        cache.reserve(hi + T)  # may replace the tensors: take pointers after
        ks, vs = self._pointers(cache)
        pk, pv, plen = self._shared_pointers(cache) if cache.shared else (None, None, None)
        end = hi + T if plen is None else int((start + plen).max()) + T  # positions to rotate
        rope = self._rope_table(end)
        status = self.lib.ponder_forward(
            self._struct_ptr, ids.data_ptr(), B, T, lengths.data_ptr(), ks, vs, cache.capacity, pk, pv,
            None if plen is None else plen.ctypes.data, rope[2], rope[3], *self._head_ptrs,
            None if sel is None else sel.data_ptr(), 0 if sel is None else sel.shape[0], logits.data_ptr(),
            self.threads_for(B * T))
        if status == 2:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        if status != 0:
            raise MemoryError("the C kernel could not allocate its scratch memory")
        return start

    def run_torch(self, input_ids: torch.Tensor, cache: KVCache | None, num_new: torch.Tensor | None = None,
                  last_only: bool = False) -> torch.Tensor:
        B, T = input_ids.shape
        if cache is None:  # a whole causal sequence: run it through a scratch cache
            cache = KVCache(self.cfg.num_hidden_layers, B, self.KV, self.D, T)
        n_out = self.head.shape[1] if self.score is None else self.score[0].shape[1]
        sel = None
        if last_only:
            last = torch.full((B,), T - 1) if num_new is None else num_new - 1
            sel = torch.arange(B) * T + last
            logits = torch.empty((B, n_out))
        else:
            logits = torch.empty((B, T, n_out))
        start = self._call(input_ids, cache, logits, sel)
        cache.lengths = torch.from_numpy(start + (T if num_new is None else num_new.numpy()))
        return logits

    def greedy_draft(self, feed: list[int], k: int, cache: KVCache) -> list[int]:
        """k greedy tokens for one row (see ``ponder_greedy_draft``): feed the pending
        tokens, then each argmax; the last draft is not fed."""
        if cache.batch_size != 1 or self.score is not None:
            raise ValueError("greedy drafting takes one row of a language model")
        if not feed or k < 1:
            raise ValueError("greedy drafting needs at least one pending token and k >= 1")
        self._fresh()
        ids = np.asarray(feed, dtype=np.int64)  # the kernel checks the ids' range itself
        start = np.array(cache.lengths.numpy(), dtype=np.int64)  # a copy: the kernel advances it
        end = int(start[0]) + len(feed) + k
        cache.reserve(end)
        ks, vs = self._pointers(cache)
        rope = self._rope_table(end)
        tokens = np.empty(k, dtype=np.int64)
        status = self.lib.ponder_greedy_draft(self._struct_ptr, ids.ctypes.data, len(feed), k, start.ctypes.data, ks,
                                              vs, cache.capacity, rope[2], rope[3], self._head_ptrs[0],
                                              self._head_ptrs[2], tokens.ctypes.data)
        if status == 2:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got {feed}")
        if status != 0:
            raise MemoryError("the C kernel could not allocate its scratch memory")
        cache.lengths = torch.from_numpy(start)
        return tokens.tolist()

    def greedy_steps(self, first: int, n: int, cache: KVCache, stop_ids: "np.ndarray", feed_last: bool,
                     ban: "np.ndarray" = None, ban_steps: int = 0) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Multi-step greedy decoding of one row (see ``ponder_greedy_steps``): feed
        ``first``, then up to ``n`` argmaxes (never ``ban`` in the first ``ban_steps``),
        ending after a stop id. Returns (tokens, their log-probabilities, the next-token
        logits [1, V] when the last token was fed: n tokens and ``feed_last``; else None)."""
        if cache.batch_size != 1 or cache.shared or self.score is not None or n < 1:
            raise ValueError("multi-step greedy decoding takes one unshared row of a language model and n >= 1")
        self._fresh()
        start = np.array(cache.lengths.numpy(), dtype=np.int64)  # a copy: the kernel advances it
        end = int(start[0]) + n + 1
        cache.reserve(end)
        ks, vs = self._pointers(cache)
        rope = self._rope_table(end)
        rows = self._head_ptrs[2]
        tokens, lps = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
        logits = torch.empty((1, rows))
        stop = np.ascontiguousarray(stop_ids, dtype=np.int64)
        ban = np.ascontiguousarray([] if ban is None else ban, dtype=np.int64)
        got = self.lib.ponder_greedy_steps(self._struct_ptr, int(first), n, start.ctypes.data, ks, vs, cache.capacity,
                                           rope[2], rope[3], self._head_ptrs[0], rows, stop.ctypes.data, len(stop),
                                           ban.ctypes.data, len(ban), int(ban_steps), int(feed_last),
                                           tokens.ctypes.data, lps.ctypes.data, logits.data_ptr(), self.threads_for(1))
        if got == -3:
            raise ValueError("every token is banned")
        if got == -2:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got {first}")
        if got < 0:
            raise MemoryError("the C kernel could not allocate its scratch memory")
        cache.lengths = torch.from_numpy(start)
        out = tokens[:got].tolist()
        fed = got == n and feed_last and out[-1] not in set(stop.tolist())  # a stop token is never fed
        return out, lps[:got].tolist(), (logits if fed else None)

    def greedy_speculate(self, draft: "CLlama", t_feed: list[int], d_feed: list[int], k: int, adaptive: bool,
                         budget: int, stop_ids: list[int], tcache: KVCache, dcache: KVCache) -> dict:
        """Greedy speculative rounds until a stop token or ``budget`` tokens, in one call
        (see ``ponder_greedy_speculate``). Returns {tokens, logprobs, drafted, accepted,
        rounds, t_computed, d_computed, k, t_pending, d_pending}; the caches hold what
        was accepted, the pending tokens excepted."""
        if tcache.batch_size != 1 or dcache.batch_size != 1 or k < 1 or budget < 2:
            raise ValueError("greedy speculation takes one row per model, k >= 1 and a budget >= 2")
        if not t_feed or not d_feed:
            raise ValueError("greedy speculation needs pending tokens for both models")
        room = budget + 16 + 2  # every token fed in the call: the feeds, the emitted tokens, one round's drafts
        a = self._pair_args(draft, t_feed, d_feed, room, tcache, dcache)
        out, lp = np.empty(budget, dtype=np.int64), np.empty(budget, dtype=np.float32)
        stats, t_pend, d_pend = np.zeros(7, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(2, dtype=np.int64)
        stop = np.ascontiguousarray(stop_ids, dtype=np.int64)
        n = self.lib.ponder_greedy_speculate(
            self._struct_ptr, draft._struct_ptr, a.ids_t.ctypes.data, len(t_feed), a.ids_d.ctypes.data, len(d_feed), k,
            int(adaptive), budget, stop.ctypes.data, len(stop), *a.target, *a.draft, self.cfg.vocab_size,
            out.ctypes.data, lp.ctypes.data, stats.ctypes.data, t_pend.ctypes.data, d_pend.ctypes.data,
            self.threads_for(1 + k))
        a.finish(n, tcache, dcache)
        st = stats.tolist()
        return {"tokens": out[:n].tolist(), "logprobs": lp[:n].tolist(), "drafted": st[0], "accepted": st[1],
                "rounds": st[2], "t_computed": st[3], "d_computed": st[4], "k": st[5],
                "t_pending": t_pend.tolist(), "d_pending": d_pend[: st[6]].tolist()}

    def ngram_speculate(self, ctx: list[int], k: int, max_ngram: int, budget: int, stop_ids: list[int],
                        cache: KVCache, credit: float) -> dict:
        """Greedy decoding with prompt-lookup drafts, round after round in one call (see
        ``ponder_ngram_speculate``): ``ctx`` is the prompt and the tokens so far, its
        last one pending. Returns {tokens, logprobs, drafted, accepted, rounds,
        t_computed, credit}."""
        if cache.batch_size != 1 or k < 1 or budget < 1 or len(ctx) < 1:
            raise ValueError("n-gram speculation takes one row, k >= 1, a budget >= 1 and a pending token")
        self._fresh()
        V = self.cfg.vocab_size
        buf = np.zeros(len(ctx) + budget, dtype=np.int64)
        buf[: len(ctx)] = ctx
        start = np.array(cache.lengths.numpy(), dtype=np.int64)
        end = int(start[0]) + budget + 16 + 2
        cache.reserve(end)
        ks, vs = self._pointers(cache)
        rope = self._rope_table(end)
        out, lp = np.empty(budget, dtype=np.int64), np.empty(budget, dtype=np.float32)
        stats, cr = np.zeros(6, dtype=np.int64), np.array([credit], dtype=np.float32)
        stop = np.ascontiguousarray(stop_ids, dtype=np.int64)
        n = self.lib.ponder_ngram_speculate(
            self._struct_ptr, buf.ctypes.data, len(ctx), k, max_ngram, budget, stop.ctypes.data, len(stop),
            start.ctypes.data, ks, vs, cache.capacity, rope[2], rope[3], self._head_ptrs[0], V, out.ctypes.data,
            lp.ctypes.data, stats.ctypes.data, cr.ctypes.data, self.threads_for(1 + k))
        if n == -2:
            raise ValueError(f"token ids must be in [0, {V})")
        if n < 0:
            raise MemoryError("the C kernel could not allocate its scratch memory")
        cache.lengths = torch.from_numpy(start)
        st = stats.tolist()
        return {"tokens": out[:n].tolist(), "logprobs": lp[:n].tolist(), "drafted": st[0], "accepted": st[1],
                "rounds": st[2], "t_computed": st[3], "credit": float(cr[0])}

    def greedy_round(self, draft: "CLlama", t_feed: list[int], d_feed: list[int], k: int, tcache: KVCache,
                     dcache: KVCache) -> tuple[int, list[int], list[int], list[float]]:
        """One greedy speculative round (see ``ponder_greedy_round``) with ``draft``'s
        kernel: returns (accepted a, the k drafts, the target's argmax after 0..k drafts,
        their log-probabilities); both caches are rolled back to what was accepted."""
        if tcache.batch_size != 1 or dcache.batch_size != 1 or k < 1:
            raise ValueError("a greedy round takes one row per model and k >= 1")
        if not t_feed or not d_feed:
            raise ValueError("a greedy round needs pending tokens for both models")
        args = self._pair_args(draft, t_feed, d_feed, k, tcache, dcache)
        drafts, best = np.empty(k, dtype=np.int64), np.empty(k + 1, dtype=np.int64)
        lp = np.empty(k + 1, dtype=np.float32)
        a = self.lib.ponder_greedy_round(
            self._struct_ptr, draft._struct_ptr, args.ids_t.ctypes.data, len(t_feed), args.ids_d.ctypes.data,
            len(d_feed), k, *args.target, *args.draft, self.cfg.vocab_size, drafts.ctypes.data, best.ctypes.data,
            lp.ctypes.data, self.threads_for(len(t_feed) + k))
        args.finish(a, tcache, dcache)
        return a, drafts.tolist(), best.tolist(), lp.tolist()

    def _pair_args(self, draft: "CLlama", t_feed: list[int], d_feed: list[int], room: int, tcache: KVCache,
                   dcache: KVCache) -> "_PairArgs":
        """What a call running this model and ``draft`` over one row each takes: the
        feeds, each cache's start (copies: the kernel moves them), pointers, capacity,
        RoPE tables and head, with room for ``room`` more tokens after the feeds."""
        self._fresh()
        draft._fresh()
        args = _PairArgs(np.asarray(t_feed, dtype=np.int64), np.asarray(d_feed, dtype=np.int64),
                         np.array(tcache.lengths.numpy(), dtype=np.int64),
                         np.array(dcache.lengths.numpy(), dtype=np.int64), self.cfg.vocab_size)
        parts = []
        for lm, cache, start, n in ((self, tcache, args.t_start, len(t_feed)), (draft, dcache, args.d_start, len(d_feed))):
            end = int(start[0]) + n + room
            cache.reserve(end)  # may replace the tensors: pointers after
            k, v = lm._pointers(cache)
            rope = lm._rope_table(end)
            parts.append((start.ctypes.data, k, v, cache.capacity, rope[2], rope[3], lm._head_ptrs[0]))
        args.target, args.draft = parts
        return args
