"""KV cache for a batch of sequences of different lengths.

Layout: one tensor pair per layer, ``k[l], v[l]: [B, capacity, n_kv_heads, head_dim]``,
plus ``lengths: [B]``, the number of valid tokens per row. Every row keeps its tokens
left-aligned at slots ``0 .. lengths[b]-1``, so a token's slot is its position. This is
what makes the operations below trivial:

* ``fork(rows)``: copy rows (with repeats) into a new cache, e.g. one prompt into N samples;
* ``reorder_(rows)``: the same, in place, e.g. for beam search;
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
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    # -- introspection -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1] if self.k else 0

    def nbytes_used(self) -> int:
        """Bytes of KV holding valid tokens (what a paged layout would allocate)."""
        if not self.k:
            return 0
        per_token = 2 * len(self.k) * self.k[0].shape[2] * self.k[0].shape[3] * self.k[0].element_size()
        return int(self.lengths.sum().item()) * per_token

    def nbytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    # -- growth ----------------------------------------------------------------------
    def reserve(self, needed: int, exact: bool = False) -> None:
        """Make room for ``needed`` slots per row, doubling capacity to amortise copies
        (or growing to exactly ``needed``, so that caches can be stacked)."""
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = needed if exact else max(needed, 2 * cap)
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros((t.shape[0], new_cap, t.shape[2], t.shape[3]))
                grown[:, :cap] = t
                store[i] = grown

    # -- branching ---------------------------------------------------------------------
    def fork(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache whose row i is a copy of row ``rows[i]`` of this one."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        new = KVCache.__new__(KVCache)
        new.k = [t.index_select(0, rows) for t in self.k]
        new.v = [t.index_select(0, rows) for t in self.v]
        new.lengths = self.lengths.index_select(0, rows).clone()
        return new

    def reorder_(self, rows: torch.Tensor | list[int]) -> None:
        """In place: row i becomes a copy of former row ``rows[i]`` (beam reordering)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.lengths = self.lengths.index_select(0, rows)

    def truncate_(self, n: int | torch.Tensor) -> None:
        """Roll back the last ``n`` tokens (an int for all rows, or a [B] tensor)."""
        n = torch.as_tensor(n, dtype=torch.long, device=self.lengths.device)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError("cannot truncate more tokens than a row holds")
        self.lengths = self.lengths - n

    def keep_rows_(self, rows: torch.Tensor | list[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences leaving a batch)."""
        self.reorder_(rows)

    # -- prefix reuse -----------------------------------------------------------------
    def read_row(self, row: int, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The KV of row ``row``'s first ``n`` tokens (default: all), as [L, n, H, D] copies."""
        n = int(self.lengths[row]) if n is None else n
        return (torch.stack([t[row, :n] for t in self.k]), torch.stack([t[row, :n] for t in self.v]))

    def write_prefix_(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Make row ``row`` hold the tokens whose KV is ``k, v`` [L, n, H, D] (a cache hit)."""
        n = k.shape[1]
        self.reserve(n)
        for i in range(len(self.k)):
            self.k[i][row, :n] = k[i]
            self.v[i][row, :n] = v[i]
        self.lengths[row] = n

    @staticmethod
    def concat(caches: list["KVCache"]) -> "KVCache":
        """Stack the rows of several caches into one batch (requests joining a batch)."""
        cap = max(c.capacity for c in caches)
        for c in caches:
            c.reserve(cap, exact=True)
        new = KVCache.__new__(KVCache)
        new.k = [torch.cat([c.k[i] for c in caches]) for i in range(len(caches[0].k))]
        new.v = [torch.cat([c.v[i] for c in caches]) for i in range(len(caches[0].v))]
        new.lengths = torch.cat([c.lengths for c in caches])
        return new
