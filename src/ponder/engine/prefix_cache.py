"""A radix tree of KV for token prefixes, with LRU eviction under a memory cap.

The KV of a token depends only on the tokens before it, so any request whose prompt
starts with tokens already seen (by an earlier call, another sample, or an earlier step
of a meta-generator) can reuse their KV and compute only the rest (as SGLang's
RadixAttention). Each edge holds a run of tokens and their KV,
``k, v: [layers, n, kv_heads, head_dim]``; edges split where prompts diverge, so
every token is stored once however many prompts share it.

Eviction drops least-recently-used leaves until the store is under its cap (tokens or
bytes). A hit copies KV out of the tree into the batch's cache, so no entry is ever
pinned by a running request, and eviction is always safe.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass(eq=False)
class _Node:
    key: list[int]
    k: torch.Tensor | None  # [L, n, H, D]
    v: torch.Tensor | None
    parent: "_Node | None" = None
    children: dict[int, "_Node"] = field(default_factory=dict)
    last_used: int = 0


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    tokens_looked_up: int = 0
    tokens_reused: int = 0
    tokens_inserted: int = 0
    tokens_evicted: int = 0

    @property
    def hit_rate(self) -> float:
        return self.tokens_reused / self.tokens_looked_up if self.tokens_looked_up else 0.0


# The shortest match the engine and the reward model reuse (vLLM reuses whole blocks of
# 16). Shorter matches save less than their copy costs, and they are where unrelated
# prompts meet ("Q: 3+"): reusing them made a problem's computed tokens depend on
# which concurrent problem was admitted first, so identical runs billed differently.
REUSE_BLOCK = 16


class RadixCache:
    """KV for token prefixes. ``max_tokens`` or ``max_bytes`` caps what it keeps (the
    default keeps 65,536 tokens); ``0`` means no cap. ``min_reuse``: a cached prefix
    shorter than this is not reused (a miss)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 max_tokens: int | None = None, max_bytes: int | None = None, min_reuse: int = 1) -> None:
        if not isinstance(min_reuse, int) or min_reuse < 1:
            raise ValueError(f"min_reuse must be an integer >= 1; got {min_reuse!r}")
        self.min_reuse = min_reuse
        if max_tokens is not None and max_bytes is not None:
            raise ValueError("give the prefix cache's cap in tokens or in bytes, not both")
        self.bytes_per_token = 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
        if max_bytes is not None:
            if max_bytes < 0:
                raise ValueError(f"max_bytes must be >= 0; got {max_bytes}")
            max_tokens = max_bytes // self.bytes_per_token
        if max_tokens is None:
            max_tokens = 65_536
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0 = no cap); got {max_tokens}")
        self.max_tokens = max_tokens
        self.root = _Node([], None, None)
        self.tokens = 0
        self.stats = PrefixCacheStats()
        self._clock = itertools.count(1)

    @classmethod
    def for_model(cls, cfg, dtype: torch.dtype = torch.float32, **cap) -> "RadixCache":
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, dtype, **cap)

    @property
    def nbytes(self) -> int:
        return self.tokens * self.bytes_per_token

    # -- lookup -----------------------------------------------------------------------------
    def _walk(self, ids: list[int]) -> list[tuple[_Node, int]]:
        """The path of (node, tokens of its key used) that matches the longest prefix."""
        path = []
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            n = 0
            key = child.key
            while n < len(key) and i + n < len(ids) and key[n] == ids[i + n]:
                n += 1
            path.append((child, n))
            i += n
            if n < len(key):
                break
            node = child
        return path

    def match_length(self, ids: list[int]) -> int:
        m = sum(n for _, n in self._walk(list(ids)))
        return m if m >= self.min_reuse else 0

    def lookup(self, ids: list[int], limit: int | None = None) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """(m, k, v): the KV [L, m, H, D] of the longest cached prefix of ``ids``, at most ``limit`` tokens."""
        ids = list(ids)
        path = self._walk(ids)
        now = next(self._clock)
        ks, vs, m = [], [], 0
        for node, n in path:
            if limit is not None and m + n > limit:
                n = limit - m
            if n <= 0:
                break
            ks.append(node.k[:, :n])
            vs.append(node.v[:, :n])
            node.last_used = now
            m += n
        self.stats.lookups += 1
        self.stats.tokens_looked_up += len(ids)
        if m < self.min_reuse:
            return 0, None, None
        self.stats.tokens_reused += m
        return m, torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    # -- insertion ------------------------------------------------------------------------
    def insert(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> int:
        """Store KV ``[L, len(ids), H, D]`` for ``ids``; returns the tokens newly stored."""
        if k.shape[1] < len(ids):
            raise ValueError(f"KV for {k.shape[1]} tokens given for {len(ids)} ids")
        return self.insert_from(ids, lambda i, j: (k[:, i:j].clone(), v[:, i:j].clone()))

    def insert_from(self, ids: list[int], read: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Store ``ids``, asking ``read(i, j)`` for the KV [L, j - i, H, D] of positions
        i..j-1 only where the tree lacks them: a sequence whose prefix is cached copies
        just its new tail (scoring step k+1 of a path copies that step, not the path)."""
        ids = list(ids)
        now = next(self._clock)
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                k, v = read(i, len(ids))
                leaf = _Node(ids[i:], k, v, node, last_used=now)
                node.children[ids[i]] = leaf
                added = len(ids) - i
                self.tokens += added
                self.stats.tokens_inserted += added
                self._evict()
                return added
            n = 0
            key = child.key
            while n < len(key) and i + n < len(ids) and key[n] == ids[i + n]:
                n += 1
            if n < len(key):  # split the edge where the new ids diverge (or end)
                head = _Node(key[:n], child.k[:, :n].clone(), child.v[:, :n].clone(), node, last_used=now)
                child.key, child.k, child.v = key[n:], child.k[:, n:].clone(), child.v[:, n:].clone()
                child.parent = head
                head.children[child.key[0]] = child
                node.children[ids[i]] = head
                child = head
            child.last_used = now
            node = child
            i += n
        return 0

    # -- eviction ---------------------------------------------------------------------------
    def _leaves(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            nd = stack.pop()
            if nd.children:
                stack.extend(nd.children.values())
            else:
                out.append(nd)
        return out

    LOW_WATER = 0.9  # evict down to this share of the cap

    def _evict(self) -> None:
        """Least recently used leaves go (or lose their tail) until the store is back
        under LOW_WATER of its cap. Evicting below the cap, not just to it, lets one
        walk of the tree pay for many inserts: with a full cache, evicting a leaf per
        insert walked the whole tree at every insert (60 problems x 64 samples went
        from 23 s to 258 s once the cache had filled)."""
        if not self.max_tokens or self.tokens <= self.max_tokens:
            return
        target = int(self.max_tokens * self.LOW_WATER)
        while self.tokens > target:
            leaves = sorted(self._leaves(), key=lambda nd: nd.last_used)
            if not leaves:
                break
            for victim in leaves:  # (a parent left childless becomes a leaf of the next walk)
                excess = self.tokens - target
                if excess <= 0:
                    break
                if len(victim.key) > excess:  # trim the leaf's tail instead of dropping all of it
                    keep = len(victim.key) - excess
                    victim.key, victim.k, victim.v = victim.key[:keep], victim.k[:, :keep].clone(), victim.v[:, :keep].clone()
                    removed = excess
                else:
                    del victim.parent.children[victim.key[0]]
                    removed = len(victim.key)
                self.tokens -= removed
                self.stats.tokens_evicted += removed

    def clear(self) -> None:
        self.root = _Node([], None, None)
        self.tokens = 0

    def __repr__(self) -> str:
        return f"RadixCache(tokens={self.tokens}, cap={self.max_tokens or 'none'}, hit_rate={self.stats.hit_rate:.2f})"


def prefill_with_prefix_cache(lm: Any, prefix_cache: Any, prompts: Sequence[Sequence[int]], capacity: int):
    """Prefill prompts, computing only what ``prefix_cache`` lacks (at least each
    prompt's last token, whose logits start a generation), then store every prompt's
    KV there. Returns (last-token logits [B, V], cache, cached tokens reused per prompt)."""
    cache = lm.new_cache(len(prompts), capacity)
    hits = []
    for i, p in enumerate(prompts):
        m, k, v = prefix_cache.lookup(list(p), limit=len(p) - 1)
        if m:
            cache.write_prefix_(i, k, v)
        hits.append(m)
    logits, _ = lm.prefill([list(p[m:]) for p, m in zip(prompts, hits)], cache=cache)
    for i, p in enumerate(prompts):
        if hits[i] < len(p):
            prefix_cache.insert_from(list(p), lambda a, b, row=i: cache.read_row(row, b, start=a))
    return logits, cache, hits
