"""Streaming detokenization that never emits broken UTF-8, and stop-sequence detection."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded together with the first output tokens, so that tokenizers whose
# decoding depends on the left context (leading spaces) render the first tokens right.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; waits while bytes are incomplete."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return text[len(prefix):]


class StopChecker:
    """Accumulates output text, finds stop sequences, and holds back text that may start one."""

    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self.stops = stop_sequences
        self.longest = max((len(s) for s in stop_sequences), default=0)
        self.text = ""
        self.emitted = 0
        self.matched = ""

    def add(self, delta: str) -> str:
        """Appends delta; returns the text now safe to emit. Sets `matched` when a stop appears."""
        before = len(self.text)
        self.text += delta
        if self.stops and delta:
            search_from = max(0, before - self.longest + 1)
            hits = [(self.text.find(s, search_from), s) for s in self.stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                index, stop = min(hits)
                self.text = self.text[:index]
                self.matched = stop
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop sequence.
        for size in range(min(self.longest - 1, len(self.text)), 0, -1):
            suffix = self.text[-size:]
            if any(s.startswith(suffix) for s in self.stops):
                return size
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
