"""Incremental detokenisation for streaming: the text of a growing token list, one delta at a time.

Byte-level BPE tokens can end inside a multi-byte character; a delta is released only once the decoded text
no longer ends in a replacement character, and each step decodes only a short window of tokens.
"""
from __future__ import annotations

from .models import LoadedModel


class IncrementalDecoder:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.ids: list[int] = []
        self._prefix = 0   # window start: tokens before it are settled
        self._read = 0     # tokens whose text has been released

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.ids.extend(ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever text is still held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        before = self.model.decode(self.ids[self._prefix:self._read])
        after = self.model.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]
