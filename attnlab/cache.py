"""Per-layer inference caches and their memory declaration.

Each mixer layer declares what it keeps per sequence with a :class:`CacheSpec` (bytes that
grow with every token, and constant bytes), the way vLLM's ``KVCacheSpec`` does, and builds
a preallocated :class:`LayerCache` for a batch. The cost model, the memory report and the
inference engine all read the same declaration, and tests check that it equals the bytes
actually allocated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheSpec:
    """What one layer keeps for one sequence.

    bytes_per_token: grows with context (K/V, MLA latent, DSA indexer keys).
    constant_bytes:  independent of context (recurrent state, conv state).
    max_tokens:      the most tokens kept (sliding window + sinks); None = every token.
    """

    bytes_per_token: int
    constant_bytes: int = 0
    max_tokens: int | None = None

    def bytes_at(self, context: int) -> int:
        """Bytes held for one sequence after ``context`` tokens."""
        kept = context if self.max_tokens is None else min(context, self.max_tokens)
        return self.bytes_per_token * kept + self.constant_bytes

    def allocated_bytes(self, max_len: int) -> int:
        """Bytes a cache preallocated for ``max_len`` tokens holds for one sequence."""
        return self.bytes_at(max_len)


@dataclass
class LayerCache:
    """Base of every layer cache: preallocated, batch-first tensors plus per-row lengths.

    Subclasses are dataclasses whose tensor fields all have the batch as dim 0, so
    :meth:`rows` can hand out views of a slice of the batch (used to prefill prompts of
    different lengths one row at a time into one batched cache).
    ``lengths`` (int64, ``[B]``) counts the tokens each row has seen.
    """

    lengths: torch.Tensor

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The cached state (everything but ``lengths``)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "lengths" and isinstance(getattr(self, f.name), torch.Tensor)
        }

    def nbytes(self) -> int:
        """Bytes allocated for the cached state (``lengths`` bookkeeping excluded)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def capacity(self) -> int | None:
        """Tokens a row can hold in all; None = unbounded (a recurrent state; caches with a
        preallocated length override this)."""
        return None

    def rows(self, start: int, stop: int) -> LayerCache:
        """A cache of the same type whose tensors are views of rows ``start:stop``."""
        changes = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = v[start:stop]
        return dataclasses.replace(self, **changes)

    def reset(self) -> None:
        """Forget every sequence (zero the state, lengths to 0) without reallocating."""
        for t in self.state_tensors().values():
            t.zero_()
        self.lengths.zero_()
