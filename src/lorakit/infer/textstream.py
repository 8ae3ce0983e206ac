"""Generated token ids to text, as they come, cut at the first stop string.

A served completion is streamed piece by piece, yet must end exactly where the whole text would:
at the first occurrence of any of the request's stop strings (OpenAI's ``stop``), which may span
several tokens. So each new token re-decodes the generated ids, and a piece is released only
when it is final: text that ends in an unfinished character (a token may carry half of a UTF-8
character, decoded as U+FFFD) or that could still grow into a stop string is held back until
the next token settles it. The pieces joined are the text of the whole completion.
"""

from __future__ import annotations

__all__ = ["TextStream"]


class TextStream:
    """Feed token ids with `push`; each call returns the new text that is final (maybe "")."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.ids: list[int] = []  # the tokens taken, up to and including the one completing a stop string
        self.text = ""  # the text released so far
        self.stopped = False  # a stop string was found: the text ends before it, later tokens are ignored

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[:len(text) - self._held(text)])

    def finish(self) -> str:
        """The rest of the text once no token will come (held-back text that was no stop)."""
        if self.stopped or not self.ids:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _held(self, text: str) -> int:
        """How many characters at the end of ``text`` could be the start of a stop string."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        piece = upto[len(self.text):]
        self.text = upto
        return piece
