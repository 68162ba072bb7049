"""Chat templates (same text as transformers), reasoning split (also streamed), incremental detokenisation,
and `sobre chat` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

import sobre
from sobre.chat import ReasoningStream, render, split_reasoning
from sobre.tokenizer import TextStream, Tokenizer
from sobre.tools import CALLS_BEGIN, CALLS_END, SEP, CallPrefix, ToolCallStream, split_tool_calls

from conftest import random_model

SPECIAL = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "and 3+3?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"}}, "required": ["city"]}}}]
TOOL_CONVO = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "content": "20°C", "tool_call_id": "call_1"}]
# DeepSeek-R1's (and V3's) own template, as its tokenizer_config.json on the Hub ships it (MIT licence)
R1_TEMPLATE = (Path(__file__).parent / "data" / "deepseek_r1_chat_template.jinja").read_text()
LLAMA_LIKE = ("{{ strftime_now('%Y') }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def toy_tokenizer():
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["héllo wörld, the answer is 42 😀", "<think> reasoning </think> answer"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(tok, {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1]})


def test_default_template_is_r1_style():
    assert render(CONVO) == ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>2+2?<｜Assistant｜>4<｜end▁of▁sentence｜>"
                             "<｜User｜>and 3+3?<｜Assistant｜><think>\n")
    assert render(CONVO, thinking=False).endswith("<｜Assistant｜>")
    with pytest.raises(ValueError, match="unknown role robot"):
        render([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        render([{"role": "user"}])


@pytest.mark.parametrize("template", [None, LLAMA_LIKE, R1_TEMPLATE])
def test_templates_render_like_transformers(template):
    from transformers import PreTrainedTokenizerFast
    tok = toy_tokenizer()
    tok.chat_template = template
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                 chat_template=template or sobre.chat.DEFAULT_TEMPLATE)
    want = hf.apply_chat_template(CONVO, tokenize=False, add_generation_prompt=True, thinking=True)
    assert tok.apply_chat_template(CONVO) == want
    if template is R1_TEMPLATE:  # its own tool-call format (function<｜tool▁sep｜>NAME + a json fence), results
        want = hf.apply_chat_template(TOOL_CONVO, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(TOOL_CONVO, tools=TOOLS) == want
        assert ('<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
                '<｜tool▁call▁end｜>') in want and want.endswith("20°C<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")
        assert split_tool_calls(want[want.index(CALLS_BEGIN):want.index(CALLS_END) + len(CALLS_END)])[1][0][
            "function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    if template is None:  # tools, an assistant's tool calls and a tool's result
        want = hf.apply_chat_template(TOOL_CONVO, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(TOOL_CONVO, tools=TOOLS) == want
        assert want.startswith("<｜begin▁of▁sentence｜>Use tools.\n\n## Tools\n") and "e.g. Zürich" in want
        assert ('<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
                '<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁output▁begin｜>20°C'
                '<｜tool▁output▁end｜><｜Assistant｜><think>\n') in want


CALL = "<｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜>"


@pytest.mark.parametrize("text,content,calls", [
    ("Sure." + CALLS_BEGIN + CALL.format("get_weather", ' {"city": "Paris"}') + CALL.format("now", "{}") + CALLS_END
     + "<｜end▁of▁sentence｜>", "Sure.", [("get_weather", '{"city": "Paris"}'), ("now", "{}")]),
    (CALLS_BEGIN + CALL.format("function", 'get_weather\n```json\n{"city": "Paris"}\n```') + CALLS_END, "",
     [("get_weather", '{"city": "Paris"}')]),  # V3 / R1's format
    ("no call, a <｜tool", "no call, a <｜tool", []),
    ("cut short" + CALLS_BEGIN + '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"ci',
     "cut short" + CALLS_BEGIN + '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"ci', []),
    (CALLS_BEGIN + CALL.format("a", "{}") + '<｜tool▁call▁begin｜>b<｜tool▁sep｜>{"x', "", [("a", "{}")]),
    ("Let me check.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
     '<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
     '<｜DSML｜invoke name="now">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>', "Let me check.\n\n",
     [("get_weather", '{"city": "Zürich", "days": 3}'), ("now", "{}")]),  # V3.2's DSML
    ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="false">{"a": [1]}'
     '</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "", [("f", '{"q": {"a": [1]}}')]),  # V4's
    ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="true">unfinished',
     '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="q" string="true">unfinished', []),
])
def test_tool_calls_parsed_whole_and_streamed(text, content, calls):
    got_content, got = split_tool_calls(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)
    for cut in range(len(text) + 1):  # every split into two deltas, and one character at a time
        for pieces in ([text[:cut], text[cut:]], list(text) if cut == 0 else []):
            if not pieces:
                continue
            s, out, names = ToolCallStream(), "", []
            for p in pieces:
                o, cs = s.feed(p)
                out += o
                names += [(c["function"]["name"], c["function"]["arguments"]) for c in cs]
            o, cs = s.flush()
            assert (out + o, names + cs) == (content, calls)


def test_call_prefix_reads_a_name_then_its_arguments():
    """tool_choice "required"'s constraint: a name among the functions', the separator, then that function's
    arguments (its schema, or any JSON object), complete when they close; accepts() leaves the state as it was."""
    schemas = {"add": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "now": None}
    c = CallPrefix(schemas)
    assert c.accepts("ad") and c.accepts("now" + SEP + "{") and not c.accepts("sub") and not c.accepts("add{")
    assert not c.accepts(" add") and c.head == "" and c.args is None
    assert c.feed("ad") and c.feed("d" + SEP) and not c.complete
    assert not c.accepts('{"b"') and not c.accepts("{}") and c.accepts('{"a": 1}')
    assert c.feed('{"a": 12') and not c.complete and c.feed("}") and c.complete
    free = CallPrefix(schemas)
    assert free.feed("now" + SEP + '{"x": [1]}') and free.complete


@pytest.mark.parametrize("text,started,want", [
    ("<think>\nplan\n</think>\n\nanswer", False, ("plan", "answer")),
    ("plan</think>answer", True, ("plan", "answer")),
    ("still thinking", True, ("still thinking", "")),
    ("just an answer", False, ("", "just an answer")),
    ("<think>a</think>b</think>c", False, ("a", "b</think>c")),
    ("\n1s: 3 + 5\n\nso 8.\n</think>\n\nAnswer: 8 \n", True, ("1s: 3 + 5\n\nso 8.", "Answer: 8")),
    ("  \n</think>\n\n  Answer\n\nis 8\n", True, ("", "Answer\n\nis 8")),
])
def test_split_reasoning(text, started, want):
    assert split_reasoning(text, started) == want
    for step in (1, 2, 3, 7):  # the streamed deltas add up to the same parts exactly, however the text is cut
        rs, r, c = ReasoningStream(started), "", ""
        for i in range(0, len(text), step):
            dr, dc = rs.feed(text[i:i + step])
            r, c = r + dr, c + dc
        dr, dc = rs.flush()
        assert (r + dr, c + dc) == want


def test_text_stream_holds_back_partial_utf8():
    tok = toy_tokenizer()
    ids = tok.encode("héllo wörld 😀 ok")
    stream = TextStream(tok)
    pieces = [stream.feed(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == "héllo wörld 😀 ok"
    assert all("\ufffd" not in p for p in pieces)
    stream = TextStream(tok)  # a stream cut inside a character ends with U+FFFD, as decode does
    cut = ids[:-1] if tok.decode(ids[:-1]).endswith("\ufffd") else ids[:-2]
    assert "".join(stream.feed(i) for i in cut) + stream.flush() == tok.decode(cut)


def test_text_stream_keeps_think_tags_drops_eos():
    tok = toy_tokenizer()
    ids = tok.encode("<think> reasoning </think> answer") + [tok.eos_id]
    stream = TextStream(tok)
    text = "".join(stream.feed(i) for i in ids)
    assert text == "<think> reasoning </think> answer"
    assert split_reasoning(text, False) == ("reasoning", "answer")


def chat_model(tmp_path) -> Path:
    tok = toy_tokenizer()
    path = sobre.save(random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=1)),
                      tmp_path / "m")
    tok.tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tok.config))
    return path


def test_sobre_chat_end_to_end(tmp_path):
    path = chat_model(tmp_path)
    out = subprocess.run([sys.executable, "-m", "sobre", "chat", str(path), "--max-new-tokens", "12",
                          "--temperature", "0"], input="hello\n/think\nagain\n/reset\n/exit\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(">") >= 3 and "/reset" in out.stderr
    assert "\x1b[" not in out.stdout  # piped: the reasoning plain, no terminal escapes
    assert "MTP speculative" not in out.stderr
    spec = subprocess.run([sys.executable, "-m", "sobre", "chat", str(path), "--max-new-tokens", "12",
                           "--temperature", "0", "--speculative"], input="hello\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert spec.returncode == 0 and "drafts accepted" in spec.stderr, spec.stderr


def test_sobre_chat_commands_and_ctrl_c(tmp_path, monkeypatch, capsys):
    """/help and an unknown command answer on stderr and never reach the model; Ctrl-C while an answer streams
    stops it and cancels its request (the engine idle, every cache block free, before the next line is read), the
    chat goes on; a message between triple quotes keeps its lines; Ctrl-C at the prompt quits. (The model int8,
    chat's path of --int8.)"""
    from sobre.cli import main
    from sobre.engine import Engine
    from sobre.int8 import Int8Linear
    path, engines, prompts, fed = chat_model(tmp_path), [], [], []
    stream, feed = Engine.stream, TextStream.feed

    def recording(self, prompt, **kw):
        engines.append(self)
        prompts.append(prompt)
        return stream(self, prompt, **kw)

    def interrupted(self, t):  # Ctrl-C lands in chat's own loop on the first answer's 4th token
        fed.append(t)
        if len(fed) == 4:
            raise KeyboardInterrupt
        return feed(self, t)

    def lines():
        yield from ("/help", "/nope", "hello")
        eng = engines[0]
        assert not eng.has_work() and len(eng.pool.free) == eng.pool.n_blocks - 1  # (block 0: the null block)
        yield "again"
        yield from ('"""/first line', "second line", 'third"""')  # one message of three lines
        raise KeyboardInterrupt

    it = lines()
    monkeypatch.setattr("builtins.input", lambda prompt="": next(it))
    monkeypatch.setattr(Engine, "stream", recording)
    monkeypatch.setattr(TextStream, "feed", interrupted)
    assert main(["chat", str(path), "--max-new-tokens", "12", "--temperature", "0", "--int8"]) in (0, None)
    err = capsys.readouterr().err
    assert "unknown command /nope" in err and err.count("/help") == 3 and "[stopped]" in err
    assert len(prompts) == 3  # hello, again, the three lines: the commands never reached the model
    assert "/first line\nsecond line\nthird<" in sobre.load_tokenizer(path).decode(prompts[2])
    assert any(isinstance(m, Int8Linear) for m in engines[0].model.modules())
