"""OpenAI `stop` sequences over streamed text.

The stop string itself is never returned, and streamed text never shows the beginning of a
stop string that might still complete: the longest suffix that is a prefix of some stop
sequence is held back until the next delta decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text that is safe to pass on; sets `stopped` when a stop sequence appears."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        hold = max((k for s in self._stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """End of generation: a held-back partial match is ordinary text after all."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text
