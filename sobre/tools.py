"""Tool (function) calls in DeepSeek's format, as its chat templates write them and vLLM's deepseek_v3 parser
reads them: calls parsed out of a completion, also while streaming.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

(V3.1 and later); V3 / R1 write `function<｜tool▁sep｜>NAME` then the arguments in a ```json fence. Text before
the calls is the message's content; a call left unfinished (the completion ran out of tokens) stays text.
"""

from __future__ import annotations

import uuid

from .chat import partial_suffix

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"


def call_prefix(name: str | None = None) -> str:
    """What a forced call starts with (tool_choice "required", or a named function: its name too)."""
    return CALLS_BEGIN + CALL_BEGIN + (f"{name}{SEP}" if name is not None else "")


def parse_call(body: str) -> dict:
    """The text between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜> -> an OpenAI tool call."""
    name, _, args = body.partition(SEP)
    name, args = name.strip(), args.strip()
    if name == "function" and args.count("\n"):  # V3 / R1: function<｜tool▁sep｜>NAME\n```json\nARGS\n```
        name, _, args = args.partition("\n")
        name, args = name.strip(), args.strip()
        if args.startswith("```"):
            args = args[3:].removeprefix("json").strip()
        args = args.removesuffix("```").strip()
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """A whole completion -> (content, tool calls); without a finished call, (text, [])."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    rest, more = stream.flush()
    return content + rest, calls + more


class ToolCallStream:
    """Incremental split_tool_calls: feed text deltas, get (content delta, calls finished by it) back. Text that
    may start the calls (a partial `<｜tool▁calls▁begin｜>`) is held back until the next delta says what it is;
    after it, text is held until each call ends."""

    def __init__(self):
        self.buf, self.calling, self.calls = "", False, 0

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.buf += delta
        if not self.calling:
            if CALLS_BEGIN not in self.buf:
                keep = partial_suffix(self.buf, CALLS_BEGIN)
                out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out, []
            out, self.buf = self.buf.split(CALLS_BEGIN, 1)
            self.calling = True
        else:
            out = ""
        calls = []
        while CALL_END in self.buf:
            body, self.buf = self.buf.split(CALL_END, 1)
            calls.append(parse_call(body.rsplit(CALL_BEGIN, 1)[-1]))
        self.calls += len(calls)
        return out, calls

    def flush(self) -> tuple[str, list[dict]]:
        """The end: held-back text that turned out not to be a call (an unfinished one, when no call finished:
        the text as it came); text after the last finished call is dropped."""
        rest, self.buf = self.buf, ""
        if self.calling and not self.calls:
            return CALLS_BEGIN + rest, []
        return ("" if self.calling else rest), []

