"""The decoder's prefix cache: prompts' keys and values, kept by adapter and tokens.

A server sees the same system prompt (and a chat its earlier turns) again and again. After a
prompt is prefilled, its keys and values are copied here; a later prompt for the same adapter
that starts with the same tokens copies the longest such start into its slot and computes only
the rest. Entries are evicted least recently used first, past ``limit_bytes``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__ = ["PrefixCache", "common_start"]


class PrefixCache:
    """``key``: what makes keys and values differ for the same tokens (the adapter, and whether it
    is merged); entries are (layers, kv heads, tokens, head_dim) keys and values."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self.hits = 0  # prompt tokens given out, since the start
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def longest(self, prompt: list[int], key) -> tuple[int, tuple | None]:
        """How many leading tokens of ``prompt`` an entry for ``key`` holds, at most one short of
        the prompt (its last token is always computed, for its logits), and that entry's name."""
        best, name = 0, None
        for entry in self._entries:
            owner, tokens = entry
            if owner == key:
                same = common_start(tokens, prompt)
                if same > best:
                    best, name = same, entry
        return max(min(best, len(prompt) - 1), 0), name

    def take(self, name: tuple, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``tokens`` keys and values of entry ``name`` (now the most recently used)."""
        self._entries.move_to_end(name)
        self.hits += tokens
        k, v = self._entries[name]
        return k[:, :, :tokens], v[:, :, :tokens]

    def add(self, key, prompt: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep copies of ``keys`` and ``values`` for ``prompt``, evicting the oldest entries past the limit."""
        if self.limit_bytes <= 0:
            return
        name = (key, tuple(prompt))
        if name in self._entries:
            self._entries.move_to_end(name)
            return
        size = 2 * keys.numel() * keys.element_size()
        if size > self.limit_bytes:
            return
        self._entries[name] = (keys.clone(), values.clone())
        self.bytes += size
        while self.bytes > self.limit_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self.bytes -= 2 * old.numel() * old.element_size()


def common_start(a, b) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
