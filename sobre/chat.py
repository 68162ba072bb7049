"""Chat: render conversations with the checkpoint's own jinja chat template (as transformers does) or a
DeepSeek-R1-style default, split reasoning (<think>...</think>) from the answer, also while streaming, and the
terminal conversation of `sobre chat` (talk)."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

THINK, END_THINK = "<think>", "</think>"

# DeepSeek-R1's conventions: earlier assistant turns lose their reasoning; a new turn opens with <think>. Tools
# (function schemas), assistant tool calls and tool results as DeepSeek-V3.1 writes them (sobre.tools parses them)
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(tools_shown=false, system=false) %}"
    "{% for m in messages %}"
    "{% if tools and not ns.tools_shown and m['role'] != 'system' %}{% set ns.tools_shown = true %}"
    "{{ '\\n\\n' if ns.system else '' }}## Tools\nYou have access to the following tools:\n"
    "{% for t in tools %}\n### {{ t['function']['name'] }}\nDescription: {{ t['function']['description'] or '' }}"
    "\n\nParameters: {{ t['function']['parameters'] | tojson }}\n{% endfor %}"
    "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
    "tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n\n"
    "{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}{% set ns.system = true %}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% if m['tool_calls'] %}<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>"
    "{{ c['function']['name'] }}<｜tool▁sep｜>{{ c['function']['arguments'] }}<｜tool▁call▁end｜>{% endfor %}"
    "<｜tool▁calls▁end｜>{% endif %}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>"
    "{% else %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% if thinking is not defined or thinking %}<think>\n{% endif %}"
    "{% endif %}"
)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson filter for chat templates (jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(msg):
    raise jinja2.exceptions.TemplateError(msg)


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # (Llama 3's templates date the prompt)
    env.filters["tojson"] = tojson
    return env.from_string(template)


def render(messages: list[dict], template: str | None = None, add_generation_prompt: bool = True,
           bos_token: str = "<｜begin▁of▁sentence｜>", eos_token: str = "<｜end▁of▁sentence｜>",
           thinking: bool = True, **extra) -> str:
    """Conversation -> prompt text. Messages are {"role": system|user|assistant|tool, "content": str}, an
    assistant's possibly with "tool_calls" ([{"type": "function", "function": {"name", "arguments"}}]); extra
    template variables such as tools=[{"type": "function", "function": {"name", "description", "parameters"}}]."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"messages[{i}] must be an object with string 'role' and 'content'")
    try:
        return _compile(template or DEFAULT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, thinking=thinking, **extra)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def split_reasoning(text: str, started_thinking: bool = True) -> tuple[str, str]:
    """Whole completion -> (reasoning_content, content). A completion that opened inside <think> (the
    prompt ended with it) and never closed it is all reasoning."""
    body = text.lstrip()
    if body.startswith(THINK):
        body, started_thinking = body[len(THINK):], True
    if END_THINK in body:
        reasoning, content = body.split(END_THINK, 1)
        return reasoning.strip(), content.strip()
    return (body.strip(), "") if started_thinking else ("", text.strip())


class ReasoningStream:
    """Incremental split_reasoning: feed text deltas, get (reasoning_delta, content_delta) back; the deltas of
    each part add up to split_reasoning's (stripped) part. Holds back a partial tag ("</thi") until the next delta
    says what it is, and whitespace until text follows it within the same part."""

    def __init__(self, started_thinking: bool = True):
        self.thinking, self.buf, self.seen_any = started_thinking, "", False
        self.reasoning, self.content = _Stripped(), _Stripped()

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        while self.buf:
            if not self.seen_any:  # a completion may open with its own <think>
                stripped = self.buf.lstrip()
                if THINK.startswith(stripped) and len(stripped) < len(THINK):
                    break
                if stripped.startswith(THINK):
                    self.buf, self.thinking = stripped[len(THINK):], True
                self.seen_any = True
                continue
            tag = END_THINK if self.thinking else None
            if tag and tag in self.buf:
                before, self.buf = self.buf.split(tag, 1)
                reasoning += self.reasoning.feed(before)
                self.thinking = False
                continue
            keep = partial_suffix(self.buf, tag) if tag else 0
            out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            if self.thinking:
                reasoning += self.reasoning.feed(out)
            else:
                content += self.content.feed(out)
            break
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        return (self.reasoning.feed(rest), "") if self.thinking else ("", self.content.feed(rest))


class _Stripped:
    """One part's deltas with the part's leading whitespace dropped and its trailing whitespace held back until
    more text follows (what is still held at the end is the part's trailing whitespace: dropped)."""

    def __init__(self):
        self.started, self.held = False, ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        return body


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---- the terminal conversation (sobre chat) ------------------------------------------------------
DIM, RESET = "\x1b[2m", "\x1b[0m"
CHAT_HELP = ('sobre chat: /reset clears the conversation, /think shows or hides reasoning, /help, /exit quits; '
             'Ctrl-C stops an answer; """ opens and closes a message of several lines')


def read_message() -> str:
    """One message from the terminal: a line, or the lines between two triple quotes (pasted text keeps its line
    breaks instead of going out a line at a time; as ollama's), stripped."""
    line = input("\n> ").strip()
    if not line.startswith('"""'):
        return line
    lines, line = [], line[3:]
    while not line.rstrip().endswith('"""'):
        lines.append(line)
        line = input(". ")
    lines.append(line.rstrip()[:-3])
    return "\n".join(lines).strip()


def talk(eng, sampling: dict, system: str = "", show: bool = True, thinking: bool = True,
         max_new_tokens: int = 2048):
    """Converse on the terminal with an engine (max_batch 1, with its tokenizer): each answer streamed, its
    reasoning dimmed (show) or counted (/think toggles), commands /reset /think /help /exit."""
    from .tokenizer import TextStream, eos_ids
    tok = eng.tokenizer
    stop = eos_ids(eng.model.config, tok)
    history = [{"role": "system", "content": system}] if system else []
    tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # piped or NO_COLOR: plain text, no counter
    dim, reset = (DIM, RESET) if tty else ("", "")
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = read_message()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: quit
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if line == "/think":
            show = not show
            continue
        if line.startswith("/") and len(line.split()) == 1:  # /help, or a command this chat does not know
            print(CHAT_HELP if line == "/help" else f"unknown command {line}; {CHAT_HELP}", file=sys.stderr)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        prompt_text = tok.apply_chat_template(history, thinking=thinking)
        split = ReasoningStream(started_thinking=prompt_text.rstrip().endswith(THINK))
        text, answer, n_think = TextStream(tok), "", 0
        tokens = eng.stream(tok.encode(prompt_text), max_new_tokens=max_new_tokens, **sampling, stop_token_ids=stop)
        try:
            for t in tokens:
                reasoning, content = split.feed(text.feed(t))
                answer += content
                if reasoning:
                    n_think += 1
                    if show:
                        print(dim + reasoning + reset, end="", flush=True)
                    elif tty:
                        print(f"\r{DIM}[thinking... {n_think} tokens]{RESET}", end="", flush=True)
                if content:
                    print(("\n" if n_think and answer == content else "") + content, end="", flush=True)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"\n[{e}; /reset to start over]", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C while it answers: stop there (the request is cancelled), keep what came
            tokens.close()
            print(f"\n{dim}[stopped]{reset}", file=sys.stderr)
        answer += split.flush()[1]
        history.append({"role": "assistant", "content": answer.strip()})
    print()
    spec = eng.spec_summary()
    if spec:
        print(f"[{spec}]", file=sys.stderr)
