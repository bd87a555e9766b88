"""``sfw_mode``: whole-word, case-insensitive filtering of a reply against a configured word list.

A listed word is masked only where it stands as a word of its own: the list entry ``hell`` masks "Hell!" but
never the inside of "hello" or "shell". Entries may be phrases ("two words"). The list is a text file, one entry
per line, ``#`` comments; ``CHAT_SFW_WORDS_PATH`` overrides the small neutral default shipped here.
"""
from __future__ import annotations

import re
from pathlib import Path

from common.errors import ConfigError

DEFAULT_WORDS = Path(__file__).with_name("sfw_words.txt")
MASK = "***"
_SPACE = re.compile(r"\s+")


class WordFilter:
    def __init__(self, words: list[str]):
        self.words = sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in self.words)
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if self.words else None
        self._max_words = max((len(w.split()) for w in self.words), default=1)

    @classmethod
    def from_file(cls, path: Path | None) -> WordFilter:
        path = path or DEFAULT_WORDS
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            raise ConfigError("CHAT_SFW_WORDS_PATH cannot be read as a UTF-8 text file") from None
        return cls([line.split("#", 1)[0] for line in lines])

    def apply(self, text: str) -> tuple[str, int]:
        """The text with every listed word masked, and how many were masked."""
        if self._pattern is None:
            return text, 0
        return self._pattern.subn(MASK, text)

    def stream_cut(self, text: str, start: int) -> int:
        """For a reply still being generated: the end of ``text[start:]`` that can be filtered and sent now.
        The last words (as many as the longest list entry has) wait for more text, so no entry is ever split
        between two sends; an entry already complete across the cut moves the cut to its end."""
        runs = [m.end() for m in _SPACE.finditer(text, start)]
        if len(runs) < self._max_words:
            return start
        cut = runs[-self._max_words]
        if self._pattern is not None:
            for match in self._pattern.finditer(text, start):
                if match.start() < cut < match.end():
                    cut = match.end()
        return cut
