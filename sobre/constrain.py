"""JSON mode (OpenAI's response_format {"type": "json_object"}): a completion constrained to one JSON object.

`JsonPrefix` reads text one character at a time and says whether it is still the start of a JSON object (RFC
8259: strings with escapes, numbers, true / false / null, nesting; whitespace between tokens) and when the
object is complete. The engine samples as usual and rejects a token whose text would leave the object, drawing
again without it (`redraw`: for plain temperature sampling, exactly the law of the tokens that fit; top-k / top-p
filter again what is left), and ends the completion when the object closes. Special tokens, end-of-sentence and
the request's stop tokens never fit. Whitespace between tokens comes in runs of at most WS_RUN characters and
WS_LINES line breaks (JSON allows any amount; a model that ranks a newline first, as a random or weakly trained one
may, would otherwise pad until max_tokens and never open the object; outlines allows one space by default,
lm-format-enforcer 12 in a row). JSON-mode rows decode without MTP drafts. Pure Python: a check costs microseconds
per character; a step that rejects 16 draws checks every token of the vocabulary once.
"""

from __future__ import annotations

import torch

WS = " \t\n\r"
WS_RUN, WS_LINES = 20, 2  # the longest run of whitespace between two tokens: characters, line breaks ("\n")
DIGITS = "0123456789"
ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}  # (and \uXXXX)
ESCAPES = set(ESCAPED) | {"u"}
# number states -> may the number end here
NUMBER_END = {"zero": True, "int": True, "frac": True, "exp": True, "sign": False, "dot": False, "e": False,
              "esign": False}


class JsonPrefix:
    def __init__(self):
        self.stack: list[str] = []  # open containers, "{" or "["
        # start, value, key_or_end, key, colon, after, string, escape, unicode, number, literal or done
        self.state = "start"
        self.sub: str | int | None = None  # a number's state, a literal's rest, hex digits left, or "first"
        self.key = False  # the string being read is an object key
        self.ws = self.lines = 0  # the whitespace run being read: characters, line breaks

    @property
    def complete(self) -> bool:
        return self.state == "done"

    def accepts(self, text: str) -> bool:
        """Would text keep this a prefix of a JSON object? (self unchanged)"""
        return self._trial().feed(text)

    def _trial(self) -> JsonPrefix:
        """A copy to feed without touching self (its mutable state copied)."""
        trial = object.__new__(type(self))
        trial.__dict__.update(self.__dict__)  # (copy.copy, without its generic protocol: a hot path)
        trial.stack = list(self.stack)
        return trial

    def feed(self, text: str) -> bool:
        """Advance over text; False (and a broken state) at the first character no JSON object continues with."""
        return all(self._char(ch) for ch in text)

    def _char(self, ch: str) -> bool:
        s = self.state
        if s == "string":
            if ch == '"':
                self.state = "colon" if self.key else "after"
            elif ch == "\\":
                self.state = "escape"
            return ch >= " "  # control characters must be escaped
        if s == "escape":
            self.state, self.sub = ("unicode", 4) if ch == "u" else ("string", None)
            return ch in ESCAPES
        if s == "unicode":
            self.sub -= 1
            if not self.sub:
                self.state = "string"
            return ch in "0123456789abcdefABCDEF"
        if s == "number":
            nxt = _number(self.sub, ch)
            if nxt is not None:
                self.sub = nxt
                return True
            if not NUMBER_END[self.sub]:
                return False
            self.state = "after"  # the number ended: ch goes on from there
            return self._char(ch)
        if s == "literal":
            if ch != self.sub[0]:
                return False
            self.sub = self.sub[1:]
            if not self.sub:
                self.state = "after"
            return True
        if ch in WS:  # between tokens, before and after the object: a bounded run
            self.ws, self.lines = self.ws + 1, self.lines + (ch == "\n")
            return self.ws <= WS_RUN and self.lines <= WS_LINES
        self.ws = self.lines = 0
        if s == "start":  # json_object: the top level is an object
            return ch == "{" and self._open(ch)
        if s == "done":
            return False
        if s in ("key_or_end", "key"):
            if ch == '"':
                self.state, self.key = "string", True
                return True
            return s == "key_or_end" and ch == "}" and self._close(ch)
        if s == "colon":
            self.state, self.sub = "value", None
            return ch == ":"
        if s == "value":
            return self._value(ch)
        if s == "after":
            if ch == ",":
                self.state, self.sub = ("key" if self.stack[-1] == "{" else "value"), None
                return True
            return ch in "}]" and self._close(ch)
        raise AssertionError(s)

    def _value(self, ch: str) -> bool:
        if ch in "{[":
            return self._open(ch)
        if ch == "]" and self.stack[-1] == "[" and self.sub == "first":  # an empty array
            return self._close(ch)
        self.sub = None
        if ch == '"':
            self.state, self.key = "string", False
        elif ch == "-" or ch in DIGITS:
            self.state, self.sub = "number", ("sign" if ch == "-" else "zero" if ch == "0" else "int")
        elif ch in "tfn":
            self.state, self.sub = "literal", {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    def _open(self, ch: str) -> bool:
        self.stack.append(ch)
        self.state, self.sub = ("key_or_end", None) if ch == "{" else ("value", "first")
        return True

    def _close(self, ch: str) -> bool:
        if not self.stack or self.stack.pop() != {"}": "{", "]": "["}[ch]:
            return False
        self.state = "after" if self.stack else "done"
        return True


def _number(state: str, ch: str) -> str | None:
    """The number state after ch, or None when ch does not continue the number."""
    if ch in DIGITS:
        return {"sign": "zero" if ch == "0" else "int", "int": "int", "dot": "frac", "frac": "frac",
                "e": "exp", "esign": "exp", "exp": "exp"}.get(state)
    if ch == ".":
        return "dot" if state in ("zero", "int") else None
    if ch in "eE":
        return "e" if state in ("zero", "int", "frac") else None
    if ch in "+-":
        return "esign" if state == "e" else None
    return None


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each token's text as it reads after another token (decoders that drop a leading space, or join tokens
    with one, then agree with the streamed text); "" for special tokens and ids past the tokenizer (never part
    of a JSON answer)."""
    n = min(vocab_size, tokenizer.vocab_size)
    decode = tokenizer.tok.decode_batch  # (the tokenizers library's, in parallel)
    alone = decode([[i] for i in range(n)], skip_special_tokens=True)
    anchor = tokenizer.encode("a")[-1:]
    base = tokenizer.decode(anchor)
    after = decode([anchor + [i] for i in range(n)], skip_special_tokens=True)
    return [t and (a[len(base):] if anchor and a.startswith(base) else t) for t, a in zip(alone, after)] + \
        [""] * (vocab_size - n)


def redraw(row: torch.Tensor, first: int, fits, draw, fitting) -> int | None:
    """A token that fits, after `first` did not: draw (row [V] -> a token id, as the request samples) again with
    each rejected token's logit at -inf, which keeps the law of the tokens that fit; after 16 rejections every
    token is checked at once. fits(id) -> bool; fitting() -> [V] bools, fits of every token. None when no token
    fits."""
    row = row.clone()
    t = first
    for _ in range(16):
        row[t] = float("-inf")
        if not torch.isfinite(row).any():
            return None
        t = draw(row)
        if fits(t):
            return t
    row = row.masked_fill(~torch.tensor(fitting(), device=row.device), float("-inf"))
    return draw(row) if torch.isfinite(row).any() else None
