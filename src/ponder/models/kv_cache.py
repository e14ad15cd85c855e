"""KV cache for a batch of sequences of different lengths.

Layout: one tensor pair per layer, ``k[l], v[l]: [B, capacity, n_kv_heads, head_dim]``,
plus ``lengths: [B]``, the number of valid tokens per row. Every row keeps its tokens
left-aligned at slots ``0 .. lengths[b]-1``, so a token's slot is its position. This is
what makes the operations below trivial:

* ``fork(rows)``: copy rows (with repeats) into a new cache, e.g. one prompt into N samples;
* ``reorder_(rows)``: the same, in place, e.g. for beam search or rows retiring from a
  batch. When the new rows fit in the allocated ones, only the rows that change are
  rewritten, and only up to their valid slots: no new batch is allocated (fresh pages
  cost more than the copy) and a retiring row costs what the rows behind it hold;
* ``truncate_(k)``: roll back the last ``k`` tokens of any rows (speculative decoding)
  by lowering ``lengths``; stale slots are overwritten by the next write.

Slots at or beyond ``lengths[b]`` hold garbage that is never attended to, because the
model masks key slot ``j`` for a query at position ``p`` unless ``j <= p``.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, capacity, num_kv_heads, head_dim)
        self._set_tensors([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                          [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Shared prefixes (cascade layout): group g holds KV [P_g, n_kv_heads, head_dim] per
        # layer, kept once for every row that reads it. Row b reads group[b] (-1: none) as
        # its first base[b] positions; its own slots 0.. then hold positions base[b]...
        self.shared: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.group = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        self.base = torch.zeros(batch_size, dtype=torch.long, device=device)

    def _set_tensors(self, k: list[torch.Tensor], v: list[torch.Tensor], rows: int | None = None) -> None:
        """New KV allocations (``_k_rows``, ``_v_rows``); ``k``, ``v`` are views of their
        first ``rows`` rows (default: all). The rows beyond are spare: left by rows that
        retired, or headroom for forks and requests joining."""
        self._k_rows, self._v_rows = list(k), list(v)
        self._view(k[0].shape[0] if k and rows is None else rows or 0)

    def _view(self, rows: int) -> None:
        self.k = [t[:rows] for t in self._k_rows]
        self.v = [t[:rows] for t in self._v_rows]

    def _grown(self, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed allocations for ``rows`` rows and half as many again spare (a batch that
        grows by forks then reallocates a few times, not at every fork)."""
        shape = (rows + rows // 2, *self._k_rows[0].shape[1:])
        return [t.new_zeros(shape) for t in self._k_rows], [t.new_zeros(shape) for t in self._v_rows]

    # -- introspection -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def nbytes_used(self) -> int:
        """Bytes of KV holding valid tokens: every row's own tokens, plus each shared
        prefix once (what a paged layout would allocate)."""
        if not self.k:
            return 0
        per_token = 2 * len(self.k) * self.k[0].shape[2] * self.k[0].shape[3] * self.k[0].element_size()
        shared = sum(self.shared[g][0][0].shape[0] for g in set(self.group.tolist()) if g >= 0) if self.shared else 0
        return (int(self.lengths.numpy().sum()) + shared) * per_token

    @property
    def has_shared(self) -> bool:
        return bool(self.shared) and bool((self.group >= 0).any())

    def total_lengths(self) -> torch.Tensor:
        """Tokens per row, shared prefix included."""
        return self.base + self.lengths

    def share_rows_(self, rows: list[int] | None = None) -> None:
        """Move each given row's tokens (default: every row's) into a shared prefix of
        its own: rows forked from it later read one copy, and keep only new tokens."""
        # lengths/group/base may come from an inference-mode forward: update copies
        self.lengths, self.group, self.base = self.lengths.clone(), self.group.clone(), self.base.clone()
        for b in range(self.batch_size) if rows is None else rows:
            if int(self.group[b]) >= 0:
                raise ValueError("a row with a shared prefix cannot share again")
            n = int(self.lengths[b])
            ks = [t[b, :n].clone() for t in self.k]
            vs = [t[b, :n].clone() for t in self.v]
            self.shared.append((ks, vs))
            self.group[b] = len(self.shared) - 1
            self.base[b] = n
            self.lengths[b] = 0

    def _drop_unused_groups(self) -> None:
        used = sorted(g for g in set(self.group.tolist()) if g >= 0)
        if len(used) == len(self.shared):
            return
        remap = {g: i for i, g in enumerate(used)}
        self.shared = [self.shared[g] for g in used]
        self.group = torch.tensor([remap.get(g, -1) for g in self.group.tolist()], dtype=torch.long,
                                  device=self.group.device)

    def nbytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k_rows + self._v_rows)

    # -- growth ----------------------------------------------------------------------
    def reserve(self, needed: int, exact: bool = False) -> None:
        """Make room for ``needed`` slots per row, doubling capacity to amortise copies
        (or growing to exactly ``needed``, so that caches can be stacked)."""
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = needed if exact else max(needed, 2 * cap)
        grown = []
        for store in (self.k, self.v):
            grown.append([])
            for t in store:
                g = t.new_zeros((t.shape[0], new_cap, t.shape[2], t.shape[3]))
                g[:, :cap] = t
                grown[-1].append(g)
        self._set_tensors(*grown)

    # -- branching ---------------------------------------------------------------------
    def fork(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache whose row i is a copy of row ``rows[i]`` of this one."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        new = KVCache.__new__(KVCache)
        new._set_tensors([t.index_select(0, rows) for t in self.k], [t.index_select(0, rows) for t in self.v])
        new.lengths = self.lengths.index_select(0, rows).clone()
        new.shared = self.shared  # shared prefixes are read, never written: no copy
        new.group = self.group.index_select(0, rows).clone()
        new.base = self.base.index_select(0, rows).clone()
        new._drop_unused_groups()
        return new

    def reorder_(self, rows: torch.Tensor | list[int]) -> None:
        """In place: row i becomes a copy of former row ``rows[i]`` (beam reordering)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        if not self._move_rows(rows):
            B = rows.shape[0]
            k, v = self._grown(B)
            for new, old in zip(k + v, self.k + self.v):
                torch.index_select(old, 0, rows, out=new[:B])
            self._set_tensors(k, v, B)
        self.lengths = self.lengths.index_select(0, rows)
        self.group = self.group.index_select(0, rows)
        self.base = self.base.index_select(0, rows)
        self._drop_unused_groups()

    def _move_rows(self, rows: torch.Tensor) -> bool:
        """``reorder_`` inside the allocated rows, if they are enough: rewrite rows from the
        first that changes on, up to the longest valid length among their sources (the
        sources are gathered before any row is written, so any order is safe)."""
        B = rows.shape[0]
        if not self.k or B > self._k_rows[0].shape[0]:
            return False
        changed = (rows != torch.arange(B, device=rows.device)).nonzero()
        if changed.numel():
            first = int(changed[0, 0])
            src = rows[first:]
            n = int(self.lengths.index_select(0, src).max())
            if n:
                with torch.inference_mode():  # the tensors may come from an inference-mode pass
                    for t in self._k_rows + self._v_rows:
                        t[first:B, :n].copy_(t[:, :n].index_select(0, src))  # (3-6x faster than t[src, :n])
        self._view(B)
        return True

    def truncate_(self, n: int | torch.Tensor) -> None:
        """Roll back the last ``n`` tokens (an int for all rows, or a [B] tensor)."""
        if isinstance(n, int) and self.lengths.device.type == "cpu":  # the speculative loop's case, kept cheap
            if n < 0 or n > int(self.lengths.numpy().min()):
                raise ValueError("cannot truncate more tokens than a row holds (a shared prefix is never truncated)")
            if n:
                self.lengths = self.lengths - n
            return
        n = torch.as_tensor(n, dtype=torch.long, device=self.lengths.device)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError("cannot truncate more tokens than a row holds (a shared prefix is never truncated)")
        self.lengths = self.lengths - n

    def keep_rows_(self, rows: torch.Tensor | list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences leaving a batch)."""
        self.reorder_(rows)

    # -- prefix reuse -----------------------------------------------------------------
    def read_row(self, row: int, n: int | None = None, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV of row ``row``'s tokens ``start``..``n``-1 (default: all, shared prefix
        included), as [L, n - start, H, D] copies."""
        base, g = int(self.base[row]), int(self.group[row])
        n = base + int(self.lengths[row]) if n is None else n
        if g < 0:
            return (torch.stack([t[row, start:n] for t in self.k]), torch.stack([t[row, start:n] for t in self.v]))
        if start:
            k, v = self.read_row(row, n)
            return k[:, start:].clone(), v[:, start:].clone()
        sk, sv = self.shared[g]
        head = min(n, base)
        k = torch.stack([torch.cat([sk[i][:head], self.k[i][row, : n - head]]) for i in range(len(self.k))])
        v = torch.stack([torch.cat([sv[i][:head], self.v[i][row, : n - head]]) for i in range(len(self.v))])
        return k, v

    def write_prefix_(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make row ``row`` hold the tokens whose KV is ``k, v`` [L, n, H, D] (a cache hit)."""
        n = k.shape[1]
        self.reserve(n)
        for i in range(len(self.k)):
            self.k[i][row, :n] = k[i]
            self.v[i][row, :n] = v[i]
        self.lengths[row] = n

    def append_(self, other: "KVCache") -> None:
        """In place: ``other``'s rows join after this cache's (requests joining a running
        batch), written into spare rows when there are enough; else the batch moves once
        to a larger allocation with headroom."""
        if not self.k:
            raise ValueError("cannot append to a cache without layers")
        self.reserve(other.capacity)
        B, n = self.batch_size, other.batch_size
        if B + n > self._k_rows[0].shape[0]:
            k, v = self._grown(B + n)
            for new, old in zip(k + v, self.k + self.v):
                new[:B].copy_(old)
            self._set_tensors(k, v, B)
        with torch.inference_mode():  # the tensors may come from an inference-mode pass
            for dst, src in zip(self._k_rows + self._v_rows, other.k + other.v):
                dst[B : B + n, : src.shape[1]].copy_(src)
        self._view(B + n)
        offset = len(self.shared)
        self.shared = self.shared + other.shared
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.group = torch.cat([self.group, torch.where(other.group >= 0, other.group + offset, other.group)])
        self.base = torch.cat([self.base, other.base])

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """Stack the rows of several caches into one batch (requests joining a batch)."""
        cap = max(c.capacity for c in caches)
        for c in caches:
            c.reserve(cap, exact=True)
        new = KVCache.__new__(KVCache)
        new._set_tensors([torch.cat([c.k[i] for c in caches]) for i in range(len(caches[0].k))],
                         [torch.cat([c.v[i] for c in caches]) for i in range(len(caches[0].v))])
        new.lengths = torch.cat([c.lengths for c in caches])
        new.shared, groups, offset = [], [], 0
        for c in caches:
            new.shared += c.shared
            groups.append(torch.where(c.group >= 0, c.group + offset, c.group))
            offset += len(c.shared)
        new.group = torch.cat(groups)
        new.base = torch.cat([c.base for c in caches])
        return new
