"""Tool (function) calls in DeepSeek's formats, as its chat templates and encoders write them (and vLLM's
deepseek parsers read them): calls parsed out of a completion, also while streaming.

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

V3.1; V3 / R1 write `function<｜tool▁sep｜>NAME` then the arguments in a ```json fence. V3.2 and V4 write DSML:

    <｜DSML｜function_calls>              (V4: <｜DSML｜tool_calls>)
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">text</｜DSML｜parameter>    (string="false": a JSON value)
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

Text before the calls is the message's content; a call left unfinished (the completion ran out of tokens)
stays text.
"""

from __future__ import annotations

import json
import re
import uuid

from .chat import partial_suffix
from .constrain import JsonPrefix
from .schema import SchemaPrefix
from .tokenizer import SPECIAL

CALLS_BEGIN, CALLS_END = SPECIAL["tool_calls_begin"], SPECIAL["tool_calls_end"]
CALL_BEGIN, CALL_END, SEP = SPECIAL["tool_call_begin"], SPECIAL["tool_call_end"], SPECIAL["tool_sep"]
DSML = "｜DSML｜"
INVOKE = re.compile(f'<{DSML}invoke name="([^"]*)">')
PARAM = re.compile(f'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>', re.DOTALL)


def call_prefix(name: str | None = None) -> str:
    """What a forced call starts with (tool_choice "required", or a named function: its name too), V3.1's way."""
    return CALLS_BEGIN + CALL_BEGIN + (f"{name}{SEP}" if name is not None else "")


class CallPrefix:
    """tool_choice "required" as a constraint (the engine's JSON-mode interface: accepts / feed / complete): after
    the forced opening (call_prefix()), the text is one of the functions' names, <｜tool▁sep｜>, then that function's
    arguments as structured output (schemas: name -> its parameters' schema, None: any JSON object), and it is
    complete when they are."""

    def __init__(self, schemas: dict[str, dict | None]):
        self.schemas, self.head, self.args = schemas, "", None

    @property
    def complete(self) -> bool:
        return self.args is not None and self.args.complete

    def accepts(self, text: str) -> bool:
        if self.args is not None:
            return self.args.accepts(text)
        head, rest, args = self._name(self.head, text)
        return head is not None and (args is None or args.accepts(rest))

    def feed(self, text: str) -> bool:
        if self.args is not None:
            return self.args.feed(text)
        self.head, rest, self.args = self._name(self.head, text)
        return self.head is not None and (self.args is None or self.args.feed(rest))

    def _name(self, head: str, text: str):
        """(the name part after text, None where it leaves every name; the text past the separator; the arguments'
        constraint once the separator is there, else None)."""
        for i, ch in enumerate(text):
            head += ch
            if not any((name + SEP).startswith(head) for name in self.schemas):
                return None, "", None
            if head.endswith(SEP) and head[:-len(SEP)] in self.schemas:
                schema = self.schemas[head[:-len(SEP)]]
                return head, text[i + 1:], JsonPrefix() if schema is None else SchemaPrefix(schema)
        return head, "", None


def has_separator(tokenizer) -> bool:
    """Does the vocabulary hold <｜tool▁sep｜> as one token (DeepSeek's and sobre's do; older ones in bytes)?"""
    tok = getattr(tokenizer, "tok", None)
    return tok is not None and tok.token_to_id(SEP) is not None


def with_separator(texts: list[str], tokenizer) -> list[str]:
    """Each token's text (constrain.token_texts) with <｜tool▁sep｜>'s kept where it is one token, special or not
    (token_texts gives special tokens none): what CallPrefix reads."""
    out = list(texts)
    if (sep := tokenizer.tok.token_to_id(SEP)) is not None and sep < len(out):
        out[sep] = SEP
    return out


def tool_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name.strip(), "arguments": arguments.strip()}}


def parse_call(body: str) -> dict:
    """The text between <｜tool▁call▁begin｜> and <｜tool▁call▁end｜> -> an OpenAI tool call."""
    name, _, args = body.partition(SEP)
    if name.strip() == "function" and "\n" in args.strip():  # V3 / R1: function<｜tool▁sep｜>NAME\n```json ...```
        name, _, args = args.strip().partition("\n")
        args = args.strip()
        if args.startswith("```"):
            args = args[3:].removeprefix("json")
        args = args.strip().removesuffix("```")
    return tool_call(name, args)


def parse_invoke(body: str) -> dict:
    """A DSML invoke (up to its </｜DSML｜invoke>) -> an OpenAI tool call; its parameters become a JSON object."""
    names = INVOKE.findall(body)
    args = {}
    for key, is_text, value in PARAM.findall(body):
        if is_text == "true":
            args[key] = value
        else:
            try:
                args[key] = json.loads(value)
            except ValueError:  # (not JSON after all: kept as the text it is)
                args[key] = value
    return tool_call(names[-1] if names else "", json.dumps(args, ensure_ascii=False))


# the opening of a block of calls -> (what ends one call, its parser)
FORMATS = {CALLS_BEGIN: (CALL_END, lambda body: parse_call(body.rsplit(CALL_BEGIN, 1)[-1])),
           f"<{DSML}function_calls>": (f"</{DSML}invoke>", parse_invoke),
           f"<{DSML}tool_calls>": (f"</{DSML}invoke>", parse_invoke)}


def split_tool_calls(text: str) -> tuple[str, list[dict]]:
    """A whole completion -> (content, tool calls); without a finished call, (text, [])."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    rest, more = stream.flush()
    return content + rest, calls + more


class ToolCallStream:
    """Incremental split_tool_calls: feed text deltas, get (content delta, calls finished by it) back. Text that
    may open a block of calls (a partial opening tag) is held back until the next delta says what it is; after
    the opening, text is held until each call ends."""

    def __init__(self):
        self.buf, self.opened, self.calls = "", None, 0

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.buf += delta
        out = ""
        if self.opened is None:
            found = [(self.buf.find(tag), tag) for tag in FORMATS if tag in self.buf]
            if not found:
                keep = max(partial_suffix(self.buf, tag) for tag in FORMATS)
                out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return out, []
            at, self.opened = min(found)
            out, self.buf = self.buf[:at], self.buf[at + len(self.opened):]
        end, parse = FORMATS[self.opened]
        calls = []
        while end in self.buf:
            body, self.buf = self.buf.split(end, 1)
            calls.append(parse(body))
        self.calls += len(calls)
        return out, calls

    def flush(self) -> tuple[str, list[dict]]:
        """The end: held-back text that turned out not to be a call (an unfinished one, when no call finished:
        the text as it came); text after the last finished call is dropped."""
        rest, self.buf = self.buf, ""
        if self.opened is not None and not self.calls:
            return self.opened + rest, []
        return ("" if self.opened is not None else rest), []
