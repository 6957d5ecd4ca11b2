"""Incremental detokenization with stop strings.

Decoding the whole output every step costs O(length²) over a request; decoding only the new token
breaks words and multi-byte characters that span tokens. So each step decodes a short window: the
tokens since the last complete read, with a few earlier tokens as context (the tokenizer needs them
to place leading spaces), and emits the text past what that context decoded to. A window ending in
U+FFFD is an unfinished UTF-8 sequence: wait for the next token.

Stop strings: the text up to (not including) the first stop string is the output. While a request
runs, the last ``len(longest stop) - 1`` characters are held back from the stream, since they may
be the start of a stop string that the next tokens complete.

Without stop strings nothing needs the text until someone reads it, so ``push`` only queues the
token and reading ``text`` or ``delta`` catches up, decoding all queued tokens as one window: a
reader every step (streaming) costs what it did, and a reader at the end (offline generation, the
benchmark) pays one decode per request instead of two per token on the engine's step loop.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first output token's spacing


def fast_decoder(tokenizer, skip_special_tokens: bool):
    """``tokenizer.decode`` with transformers' per-call overhead cut out where that is exact.

    A fast tokenizer's ``decode`` converts its arguments and then calls the Rust tokenizer; the
    wrapper costs ~5x the decode itself for the 1-6 token windows decoded here, twice per token of
    every running request (0.9 of 1.6 ms of host time per batch-32 step on a 2-core CPU). Without
    ``clean_up_tokenization_spaces`` the wrapper adds nothing else, so the Rust decode is exact;
    otherwise (or for a slow tokenizer) the wrapper is used."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda tokens: backend.decode(tokens, skip_special_tokens=skip_special_tokens)
    return lambda tokens: tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True):
        self._decode = fast_decoder(tokenizer, skip_special_tokens)
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._tokens = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._prefix = 0  # window start: context for spacing
        self._read = len(self._tokens)  # tokens up to here are already in ``text``
        self._text = ""  # all output text so far (stop string cut away once found)
        self._emitted = 0  # characters of ``text`` already streamed
        self._queued = 0  # tokens at the end of _tokens not yet decoded (no stop strings only)

    @property
    def text(self) -> str:
        self._catch_up()
        return self._text

    def push(self, token_id: int) -> bool:
        """Add one output token; True when a stop string was found (the text is cut before it)."""
        self._tokens.append(token_id)
        if not self.stop:
            self._queued += 1
            return False
        return self._advance()

    def _catch_up(self) -> None:
        """Decode the queued tokens: as one window when that ends on a whole character; otherwise
        (an output that stops inside a character, or bytes that never form one) token by token, as
        ``push`` would have, so the text is the same whenever it is read."""
        queued, self._queued = self._queued, 0
        if queued == 0:
            return
        self._advance()  # (no stop strings here, so its result says nothing)
        if self._read == len(self._tokens):  # it read everything
            return
        tokens = self._tokens
        self._tokens = tokens[:len(tokens) - queued]
        for token in tokens[len(tokens) - queued:]:
            self._tokens.append(token)
            self._advance()

    def _advance(self) -> bool:
        """Decode the tokens since the last complete read as one window."""
        prefix_text = self._decode(self._tokens[self._prefix:self._read])
        window_text = self._decode(self._tokens[self._prefix:])
        if window_text.endswith("\ufffd") or len(window_text) <= len(prefix_text):
            return False
        new = window_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._tokens)
        search_from = max(len(self._text) - self._hold, 0)
        self._text += new
        found = [at for stop in self.stop if (at := self._text.find(stop, search_from)) != -1]
        if found:
            self._text = self._text[:min(found)]
        return bool(found)

    def delta(self, finished: bool) -> str:
        """Text not yet streamed; keeps back a possible stop-string start unless ``finished``."""
        text = self.text
        end = len(text) if finished or not self.stop else max(len(text) - self._hold, 0)
        end = max(end, self._emitted)
        out, self._emitted = text[self._emitted:end], end
        return out
