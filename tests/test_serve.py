"""`sobre serve`: the real openai client against a live server, concurrency, cancellation, overload, timeouts,
a bad-input storm, schemathesis over /openapi.json, and the chat page in headless Chromium."""

import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Literal

import httpx
import pytest
import torch
import uvicorn

import sobre
from sobre.chat import split_reasoning
from sobre.engine import Engine
from sobre.serve import create_app
from sobre.tokenizer import Tokenizer, train_tokenizer
from sobre.tools import CALLS_BEGIN, CALLS_END, SEP, call_prefix
from sobre.worker import EngineProcess

from conftest import random_model

CORPUS = ["What is 12 + 7? Let me think step by step about the numbers.", "The answer is 19. Sort 3 1 2.",
          "Hello there, how are you today? I am fine, thank you."] * 30


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    tok = train_tokenizer(CORPUS, vocab_size=300, out=path)
    cfg = sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_seq_len=256)
    model = random_model(cfg, seed=3)
    with torch.no_grad():  # greedy text stays readable: byte fragments and bos/pad never win the argmax
        for i in range(tok.vocab_size):
            if "\ufffd" in tok.decode([i]) or i in (tok.bos_id, tok.pad_id):
                model.head.weight[i] = 0
    sobre.save(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def long_ckpt(ckpt, tmp_path_factory):
    """The same model with a 4096-token context: long answers (tools' text, requests still running when cancelled)."""
    path = shutil.copytree(ckpt, tmp_path_factory.mktemp("serve") / "long")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 4096}))
    return path


class Live:
    """A uvicorn server on 127.0.0.1 (random port) in a thread."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.srv = app.state.server

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.srv.loop.close()


@pytest.fixture(scope="module")
def live(long_ckpt):  # the engine in its own process on every core, as `sobre serve` runs it (others: a thread)
    s = Live(create_app(EngineProcess(long_ckpt, threads=os.cpu_count() or 1, max_batch=16, prefix_cache=True), "tiny"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(long_ckpt):
    return Engine.from_pretrained(long_ckpt)


def greedy(ref, prompt_ids, n):
    """The engine's greedy tokens and their text as the server streams it (no begin/end/pad tokens)."""
    t = ref.tokenizer
    out = ref.generate([prompt_ids], max_new_tokens=n, stop_token_ids=(t.eos_id,))[0]
    return out, t.decode([x for x in out if x not in (t.bos_id, t.eos_id, t.pad_id)])


def chat_ids(ref, messages):
    return ref.tokenizer.encode(ref.tokenizer.apply_chat_template(messages))


def test_prefix_cache_hits_show_in_usage(live, ref):
    """A long shared system prompt: the second request reuses its cached blocks (DeepSeek's
    prompt_cache_hit/miss_tokens, OpenAI's cached_tokens) and answers exactly as without a cache."""
    system = {"role": "system", "content": " ".join(CORPUS[:6])}
    usages = []
    for q in ("What is 12 + 7?", "Sort 3 1 2."):
        msgs = [system, {"role": "user", "content": q}]
        ids, text = greedy(ref, chat_ids(ref, msgs), 8)
        r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": msgs, "temperature": 0, "max_tokens": 8})
        body = r.json()
        assert r.status_code == 200 and body["usage"]["completion_tokens"] == len(ids)
        msg = body["choices"][0]["message"]
        assert (msg.get("reasoning_content") or "") + (msg["content"] or "") == "".join(split_reasoning(text, True)[i]
                                                                                    or "" for i in (0, 1))
        usages.append(body["usage"])
    n = len(chat_ids(ref, [system]))
    assert n > 64 and usages[1]["prompt_cache_hit_tokens"] >= 64 * ((n - 8) // 64)
    assert usages[1]["prompt_cache_hit_tokens"] + usages[1]["prompt_cache_miss_tokens"] == usages[1]["prompt_tokens"]
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": usages[1]["prompt_cache_hit_tokens"]}


def test_tokenize_and_detokenize(live, ref):
    """vLLM's /tokenize gives the ids the chat and completion endpoints feed the model (the count a chat's usage
    reports), /detokenize the text back; bad bodies are 4xx."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]
    with httpx.Client(base_url=live.url, timeout=60) as c:
        r = c.post("/tokenize", json={"messages": msgs}).json()
        assert r["tokens"] == chat_ids(ref, msgs) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
        chat = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2}).json()
        assert chat["usage"]["prompt_tokens"] == r["count"]
        bare = c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
        assert bare == ref.tokenizer.encode(ref.tokenizer.apply_chat_template(msgs, add_generation_prompt=False))
        assert r["tokens"][:len(bare)] == bare and len(bare) < r["count"]
        r = c.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert r["tokens"] == ref.tokenizer.encode("Hello world") and len(r["token_strs"]) == r["count"]
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "Hello world"}
        check_error(c.post("/tokenize", json={}), 422)
        check_error(c.post("/tokenize", json={"prompt": "x", "messages": msgs}), 422)
        check_error(c.post("/tokenize", json={"prompt": "x", "model": "gpt-9"}), 404)
        check_error(c.post("/detokenize", json={"tokens": [10**9]}), 400)


def test_openai_client_chat_and_completions(live, ref):
    from openai import OpenAI
    client = OpenAI(base_url=live.url + "/v1", api_key="none")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 7?"}]
    ids, text = greedy(ref, chat_ids(ref, msgs), 24)
    want_reasoning, want_content = split_reasoning(text, True)

    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (want_reasoning, want_content)
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(chat_ids(ref, msgs))
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == ref.tokenizer.eos_id else "length")

    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
                        if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (want_reasoning, want_content)  # (the deltas add up to the message)
    assert chunks[-1].usage.completion_tokens == len(ids)

    prompt = "What is 12 + 7?"
    ids, text = greedy(ref, ref.tokenizer.encode(prompt), 16)
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=16, logprobs=3)
    assert r.choices[0].text == text and len(r.choices[0].logprobs.tokens) == len(ids)
    assert all(len(t) <= 3 for t in r.choices[0].logprobs.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ref.tokenizer.encode(prompt), temperature=0, max_tokens=16, stream=True))
    assert streamed == text
    assert [m.id for m in client.models.list().data] == ["tiny"]


class Scripted(torch.nn.Module):
    """A head that writes a script: the i-th call's logits put all mass on script[i] (then end-of-sentence), so
    a served model answers with exactly that text, sampled or not."""

    def __init__(self, vocab: int, eos: int):
        super().__init__()
        self.vocab, self.eos, self.script, self.i = vocab, eos, [], 0

    def forward(self, h):  # [B, D] -> [B, V]
        t = self.script[self.i] if self.i < len(self.script) else self.eos
        self.i += 1
        return torch.full((*h.shape[:-1], self.vocab), -1e9).index_fill_(-1, torch.tensor([t]), 0.0)


def test_tool_calls_and_json_mode_openai_client(long_ckpt):
    """Tools reach the prompt (chat template), DeepSeek-format calls in the answer come back as OpenAI tool_calls
    (finish_reason tool_calls), streamed as tool_calls deltas; tool_choice "required" / a named function
    force the call's start; tool results go back into the prompt; bad tool requests get 4xx. JSON mode
    (response_format json_object) answers the object and ends there."""
    from openai import BadRequestError, OpenAI
    from pydantic import BaseModel, Field
    eng = Engine.from_pretrained(long_ckpt)  # the tools' text takes ~370 tokens here
    tok = eng.tokenizer
    head = eng.model.head = Scripted(eng.model.config.vocab_size, tok.eos_id)
    prompts = []
    add = eng.add_request
    eng.add_request = lambda prompt, *a, **kw: prompts.append(tok.decode(prompt)) or add(prompt, *a, **kw)
    server = Live(create_app(eng, "tiny"))
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    call = '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜>'
    try:
        for stream in (False, True):
            head.script, head.i = tok.encode("Look it up.</think>On it." + CALLS_BEGIN + call + CALLS_END), 0
            r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, stream=stream)
            if not stream:
                msg, finish = r.choices[0].message, r.choices[0].finish_reason
                content, reasoning, calls = msg.content, msg.model_extra["reasoning_content"], msg.tool_calls
            else:
                chunks = [c for c in r if c.choices]
                content = "".join(c.choices[0].delta.content or "" for c in chunks)
                reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                    for c in chunks).strip()
                calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
                finish = chunks[-1].choices[0].finish_reason
            assert (reasoning, content, finish) == ("Look it up.", "On it.", "tool_calls")
            assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
            assert calls[0].id.startswith("call_") and calls[0].type == "function"
            assert "## Tools" in prompts[-1] and '"city": {"type": "string"}' in prompts[-1]

        cut = "Wait." + CALLS_BEGIN + '<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"ci'  # ends before the call does
        for stream in (False, True):
            head.script, head.i = tok.encode("x</think>" + cut), 0
            r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, stream=stream)
            text = "".join(c.choices[0].delta.content or "" for c in r if c.choices) if stream else \
                r.choices[0].message.content
            assert text == cut  # an unfinished call stays text

        for choice, prefix in (("required", call_prefix()), ({"type": "function", "function": {"name": "get_weather"}},
                                                           call_prefix("get_weather"))):
            rest = '{"city": "Rome"}<｜tool▁call▁end｜>' if prefix.endswith("<｜tool▁sep｜>") else \
                call.removeprefix("<｜tool▁call▁begin｜>")
            head.script, head.i = tok.encode(rest + CALLS_END), 0
            r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice=choice)
            assert prompts[-1].endswith("<think>\n</think>" + prefix)  # (the call is the answer, not reasoning)
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
            assert r.choices[0].message.tool_calls[0].function.name == "get_weather"

        # a named function's arguments follow its parameters (a key it does not take refused; none: {}), and the
        # call closes where they end, streamed or not; strict parameters sobre cannot enforce, or response_format
        # beside a named function: 400
        named = {"type": "function", "function": {"name": "get_weather"}}
        for stream in (False, True):
            head.script, head.i = tok.encode('{"city": "Rome", "zz": 1} and more'), 0
            r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice=named,
                                               stream=stream)
            chunks = [c for c in r if c.choices] if stream else None
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()] if stream else \
                r.choices[0].message.tool_calls
            finish = chunks[-1].choices[0].finish_reason if stream else r.choices[0].finish_reason
            assert finish == "tool_calls" and json.loads(calls[0].function.arguments) == {"city": "Rome"}
        bare = [{"type": "function", "function": {"name": "now"}}]
        head.script, head.i = tok.encode('{"a": 1}'), 0
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=bare,
                                           tool_choice={"type": "function", "function": {"name": "now"}})
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {}
        strict = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "string"}}, "dependentRequired": {}}}}]
        for kw, param in ((dict(tools=strict, tool_choice={"type": "function", "function": {"name": "f"}}), "tools"),
                          (dict(tools=tools, tool_choice=named, response_format={"type": "json_object"}),
                           "response_format"),
                          (dict(tools=tools, tool_choice="required", response_format={"type": "json_object"}),
                           "response_format")):
            with pytest.raises(BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=msgs, **kw)
            assert e.value.body["param"] == param

        head.script, head.i = tok.encode("Sunny.</think>It is 20C."), 0  # the tool's result goes back
        past = {"id": "call_1", "type": "function",  # (arguments as an object, as some clients send them back)
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        turn = msgs + [{"role": "assistant", "content": None, "tool_calls": [past]},
                       {"role": "tool", "tool_call_id": "call_1", "content": "20C, sunny"}]
        r = client.chat.completions.create(model="tiny", messages=turn, tools=tools)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("It is 20C.", "stop")
        assert r.choices[0].message.tool_calls is None
        assert call + "<｜tool▁calls▁end｜>" in prompts[-1] and "<｜tool▁output▁begin｜>20C, sunny" in prompts[-1]
        head.script, head.i = tok.encode("x</think>" + CALLS_BEGIN + call + CALLS_END), 0  # tool_choice none
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=tools, tool_choice="none")
        assert r.choices[0].message.tool_calls is None and "## Tools" not in prompts[-1]

        head.script, head.i = tok.encode('{"ok": [1, true]} and more'), 0  # JSON mode: the object, then the end
        r = client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"})
        assert json.loads(r.choices[0].message.content) == {"ok": [1, True]}
        assert r.choices[0].finish_reason == "stop" and prompts[-1].endswith("<think>\n</think>")
        schema = {"type": "object", "properties": {"ok": {"type": "array", "items": {"type": ["integer", "boolean"]}}},
                  "required": ["ok"], "additionalProperties": False}  # structured outputs
        head.script, head.i = tok.encode('{"ok": [1, true], "zz": 2} and more'), 0  # (a key it does not allow)
        r = client.chat.completions.create(model="tiny", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}})
        assert json.loads(r.choices[0].message.content) == {"ok": [1, True]} and r.choices[0].finish_reason == "stop"

        class Step(BaseModel):  # the client's parse(): a pydantic model as a strict schema ($defs, $ref, anyOf,
            n: int = Field(ge=-5, le=5)  # bounds, patterns, formats)
            note: str | None = Field(pattern="^[a-z]+$")

        class Answer(BaseModel):
            steps: list[Step]
            unit: Literal["cm", "in"]
            at: datetime

        want = Answer(steps=[Step(n=1, note=None), Step(n=-2, note="x")], unit="in",
                      at=datetime(2024, 2, 29, 12, 30, tzinfo=timezone.utc))
        head.script, head.i = tok.encode(want.model_dump_json(indent=1) + " and more"), 0
        r = client.chat.completions.parse(model="tiny", messages=msgs, response_format=Answer)
        assert r.choices[0].message.parsed == want and r.choices[0].finish_reason == "stop"

        n = len(prompts)
        for kw, param in ((dict(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}),
                           "tool_choice"), (dict(tool_choice="required"), "tool_choice")):
            with pytest.raises(BadRequestError) as e:
                client.chat.completions.create(model="tiny", messages=msgs, **kw)
            assert e.value.body["param"] == param
        bad = [{"type": "function", "function": {"name": "has space"}}]
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": msgs, "tools": bad})
        assert r.status_code == 422 and r.json()["error"]["param"] == "tools.0.function.name"
        assert len(prompts) == n  # none reached the engine
    finally:
        server.close()


def test_required_tool_call_is_constrained(tmp_path):
    """tool_choice "required" where the vocabulary holds <｜tool▁sep｜> (DeepSeek's and sobre's, a special token): the
    answer is one call, a function's name, the separator, its arguments under its parameters (a key it does not
    take refused), closed where they end, streamed or not; an engine whose vocabulary lacks the separator refuses
    such a request."""
    from openai import OpenAI
    path = tmp_path / "m"
    tok = train_tokenizer(CORPUS, vocab_size=300, out=path)
    sep = tok.tok.token_to_id(SEP)
    cfg = sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, max_seq_len=2048)
    sobre.save(random_model(cfg, seed=3), path)
    eng = Engine.from_pretrained(path)
    head = eng.model.head = Scripted(cfg.vocab_size, tok.eos_id)
    server = Live(create_app(eng, "tiny"))
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}},
             {"type": "function", "function": {"name": "add", "parameters": {
                 "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    try:
        for stream in (False, True):
            head.script, head.i = tok.encode("get_weather") + [sep] + tok.encode('{"city": "Rome", "zz": 1} more'), 0
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Rome?"}],
                                               tools=tools, tool_choice="required", stream=stream)
            chunks = [c for c in r if c.choices] if stream else None
            calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()] if stream else \
                r.choices[0].message.tool_calls
            finish = chunks[-1].choices[0].finish_reason if stream else r.choices[0].finish_reason
            assert finish == "tool_calls" and calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    finally:
        server.close()
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    plain = Engine(eng.model, Tokenizer(HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))))
    with pytest.raises(ValueError, match="tool_calls: the vocabulary has no"):
        plain.add_request([1, 2], tool_calls={"add": None})


def test_logit_bias(live, ref):
    """OpenAI's logit_bias (keys: token ids as strings): +100 makes a token every pick, on both endpoints; bad
    keys, biases out of [-100, 100] and ids outside the vocabulary are 4xx. A json_schema response_format
    without a schema, or with a keyword sobre cannot enforce, is refused, not ignored."""
    t = ref.tokenizer.encode(" the")[0]
    want = ref.tokenizer.decode([t] * 4)
    url = live.url + "/v1/"
    r = httpx.post(url + "completions", json={"prompt": "Hello", "max_tokens": 4, "logit_bias": {str(t): 100}})
    assert r.json()["choices"][0]["text"] == want
    r = httpx.post(url + "chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logit_bias": {str(t): 100},
        "chat_template_kwargs": {"thinking": False}})
    assert r.json()["choices"][0]["message"]["content"] == want.strip()
    for fmt, says in (({"type": "json_schema"}, "needs json_schema.schema"),  # (refused, never ignored)
                      ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
                          "type": "object", "properties": {"a": {"type": "string", "format": "uri"}}}}},
                       "format 'uri' is not supported")):
        r = httpx.post(url + "chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "response_format": fmt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
        assert says in r.json()["error"]["message"]
    for bias, status in (({"x": 1}, 422), ({str(t): 101}, 422), ({"100000": 1}, 400)):
        r = httpx.post(url + "completions", json={"prompt": "Hello", "max_tokens": 4, "logit_bias": bias})
        assert r.status_code == status and "logit_bias" in r.json()["error"]["message"], r.json()
    # vLLM's stop_token_ids (kept under ignore_eos) and include_stop_str_in_output
    body = {"prompt": "Hello", "max_tokens": 6, "logit_bias": {str(t): 100}, "ignore_eos": True}
    r = httpx.post(url + "completions", json=body | {"stop_token_ids": [t]}).json()
    assert r["usage"]["completion_tokens"] == 1 and r["choices"][0]["finish_reason"] == "stop"
    piece = ref.tokenizer.decode([t])  # the text is piece x 6; with min_tokens 2 the stop is its second piece
    for keep, text in ((False, piece), (True, piece * 2)):
        r = httpx.post(url + "completions", json=body | {"stop": [piece], "min_tokens": 2,
                                                        "include_stop_str_in_output": keep}).json()
        assert r["choices"][0]["text"] == text and r["usage"]["completion_tokens"] == 2, r
    r = httpx.post(url + "completions", json=body | {"stop_token_ids": [10**6]})
    assert r.status_code == 400 and "stop_token_ids" in r.json()["error"]["message"]


def test_chat_logprobs_stop_strings_n_and_seed(live, ref):
    from openai import OpenAI
    client = OpenAI(base_url=live.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Sort 3 1 2."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=2)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in lp)
    assert all(x.logprob <= x.top_logprobs[0].logprob + 1e-5 for x in lp)
    _, text = greedy(ref, ref.tokenizer.encode("The answer"), 30)
    stop = text[5:8]
    for stream in (False, True):
        res = client.completions.create(model="tiny", prompt="The answer", temperature=0, max_tokens=30, stop=[stop],
                                        stream=stream)
        out = "".join(c.choices[0].text for c in res) if stream else res.choices[0].text
        assert out == text[:text.find(stop)]
    a, b = (client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, max_tokens=12, n=3, seed=7)
            for _ in range(2))
    texts = [[(c.message.model_extra["reasoning_content"], c.message.content) for c in r.choices] for r in (a, b)]
    assert len(texts[0]) == 3 and texts[0] == texts[1]  # seeded: reproducible


def test_sixteen_concurrent_streams_match_solo_greedy(live, ref):
    from openai import OpenAI
    prompts = [f"What is {i} + {2 * i}? Hello there" for i in range(16)]
    want = [greedy(ref, ref.tokenizer.encode(p), 40)[1] for p in prompts]

    def one(p):
        client = OpenAI(base_url=live.url + "/v1", api_key="none")
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=p, temperature=0, max_tokens=40, stream=True))

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, prompts))
    assert got == want


def test_disconnect_cancels_and_frees_cache(live):
    """A client that goes away mid-stream: its request is cancelled (the engine counts it: not left to run its
    4000 tokens out) and its cache blocks come back."""
    counts = live.srv.loop.counts  # the engine process's latest snapshot
    free, cancelled = counts["blocks_free"], counts["cancelled"]
    with httpx.stream("POST", live.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4000,
                                                                  "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()  # (held: `next(r.iter_lines())` left the iterator to the garbage collector, whose
        next(lines)  # closing it closed the connection - the client gone early, in ~1 run of 40)
        deadline = time.time() + 30
        while live.srv.loop.counts["running"] != 1 and time.time() < deadline:
            time.sleep(0.01)
        assert live.srv.loop.counts["running"] == 1 and live.srv.loop.counts["blocks_free"] < free, (
            live.srv.loop.counts, free, cancelled)
        lines.close()
    deadline = time.time() + 30  # (a generous bound for a loaded machine)
    while (live.srv.loop.counts["running"] or live.srv.loop.counts["blocks_free"] != free) and time.time() < deadline:
        time.sleep(0.05)
    assert live.srv.loop.counts["running"] == 0 and live.srv.loop.counts["blocks_free"] == free, (
        live.srv.loop.counts, free)
    assert live.srv.loop.counts["cancelled"] == cancelled + 1
    metrics = httpx.get(live.url + "/metrics").text
    assert "sobre_kv_cache_usage 0.0" in metrics and f"sobre_cancelled_requests_total {cancelled + 1}.0" in metrics


BAD = [  # (body, content-type, status)
    (b"{not json", "application/json", 400),
    (b"\xff\xfe\x00garbage", "application/json", 400),
    (json.dumps({"messages": "hi"}).encode(), "application/json", 422),
    (json.dumps({}).encode(), "application/json", 422),
    (json.dumps({"messages": []}).encode(), "application/json", 422),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "application/json", 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "application/json", 422),
    (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).encode(), "application/json", 404),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}).encode(), "application/json", 422),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}).encode(),
     "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(),
     "application/json", 422),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 1000}).encode(), "application/json", 422),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": [""]}).encode(), "application/json", 422),
    (json.dumps({"messages": [{"role": "user", "content": "hello " * 5000}]}).encode(), "application/json", 400),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     "application/json", 400),
    (b"x" * (9 << 20), "application/json", 413),
]


def check_error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_bad_input_storm_gets_4xx_and_server_survives(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        for body, ctype, status in BAD:
            check_error(c.post("/v1/chat/completions", content=body, headers={"content-type": ctype}), status)
        err = c.post("/v1/chat/completions", content=b'{"model":', headers={"content-type": "application/json"})
        assert err.json()["error"]["param"] is None and "not valid JSON" in err.json()["error"]["message"]
        check_error(c.post("/v1/completions", json={"prompt": [10**9]}), 400)
        check_error(c.post("/v1/completions", json={"prompt": []}), 400)
        check_error(c.post("/v1/completions", json={"prompt": [1, 2], "suffix": "y"}), 400)  # (FIM: text prompts)
        check_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, "min_tokens": 5}), 400)
        for body, param in (({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"stop_token_ids": [10**9]},
                            "stop_token_ids"), ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
                            ({"top_logprobs": 2}, "top_logprobs")):  # (top_logprobs without logprobs: true)
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]} | body)
            check_error(r, 422 if param == "top_logprobs" else 400)
            assert r.json()["error"]["param"] == param, r.text
        check_error(c.get("/v1/nope"), 404)
        check_error(c.get("/v1/models/gpt-9"), 404)
        check_error(c.get("/v1/chat/completions"), 405)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert c.get("/health").json()["status"] == "ok"
        metrics = c.get("/metrics").text
        for name in ("sobre_requests_total", "sobre_queue_depth", "sobre_running_sequences",
                     "sobre_time_to_first_token_seconds_bucket", "sobre_time_per_output_token_seconds_bucket",
                     "sobre_generation_tokens_total", "sobre_spec_draft_tokens_total 0.0",
                     "sobre_spec_accepted_tokens_total 0.0", "sobre_spec_drafts_total 0.0",
                     "sobre_spec_stopped_sequences_total 0.0",
                     "sobre_prefix_cache_hit_tokens_total", "sobre_cancelled_requests_total"):
            assert name in metrics


def test_text_prompts_get_the_tokenizers_special_tokens(ckpt, tmp_path, monkeypatch):
    """A checkpoint whose tokenizer.json puts begin-of-sentence first (DeepSeek's): text prompts are encoded with
    it, as transformers' tokenizer(text) and vLLM do; token-id prompts and echo stay as sent. Fill in the middle
    (`suffix`, also at DeepSeek's /beta/completions): the PSM prompt after begin-of-sentence; token-id prompts and
    tokenizers without the FIM tokens get a 400."""
    from tokenizers import processors
    path = shutil.copytree(ckpt, tmp_path / "bos")
    tok = sobre.load_tokenizer(path)
    tok.tok.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                           special_tokens=[(tok.bos_token, tok.bos_id)])
    tok.tok.save(str(path / "tokenizer.json"))
    s = Live(create_app(Engine.from_pretrained(path), "tiny"))
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            ids = c.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
            assert ids == [tok.bos_id] + tok.encode("Hello there")
            r = c.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3, "echo": True}).json()
            assert r["usage"]["prompt_tokens"] == len(ids) and r["choices"][0]["text"].startswith("Hello there")
            r = c.post("/v1/completions", json={"prompt": ids[1:], "max_tokens": 3}).json()
            assert r["usage"]["prompt_tokens"] == len(ids) - 1
            begin, hole, end = tok.fim_ids
            fim = tok.fim_prompt("Hello", " you")
            assert fim == [tok.bos_id, begin, *tok.encode("Hello"), hole, *tok.encode(" you"), end]
            want = Engine.from_pretrained(path).generate([fim], max_new_tokens=4, stop_token_ids=(tok.eos_id,))[0]
            for url in ("/v1/completions", "/beta/completions"):
                r = c.post(url, json={"prompt": "Hello", "suffix": " you", "max_tokens": 4, "temperature": 0}).json()
                assert r["usage"]["prompt_tokens"] == len(fim), r
                assert r["choices"][0]["text"] == tok.decode([t for t in want if t != tok.eos_id])
            r = c.post("/v1/completions", json={"prompt": ids, "suffix": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            monkeypatch.setattr(type(tok), "fim_ids", property(lambda self: None))
            r = c.post("/beta/completions", json={"prompt": "Hello", "suffix": "x"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    finally:
        s.close()


def test_generation_config_sets_the_defaults_of_unset_fields(ckpt):
    """As vLLM: a request that leaves temperature / top_p / top_k unset gets the checkpoint's
    generation_config.json values; one that sets them keeps its own (even OpenAI's own default values); vLLM's
    min_tokens reaches the engine (tests/test_engine.py: what it does)."""
    from sobre.protocol import ChatRequest
    app = create_app(Engine.from_pretrained(ckpt), "tiny", defaults={"temperature": 0.6, "top_p": 0.95, "top_k": 20})
    msgs = [{"role": "user", "content": "hi"}]
    try:
        p = app.state.server.params(ChatRequest(messages=msgs), 5, None, None, 0)
        assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.6, 0.95, 20, 0.0)
        p = app.state.server.params(ChatRequest(messages=msgs, temperature=1.0, top_k=-1, min_tokens=3), 5, None,
                                    None, 0)
        assert (p.temperature, p.top_p, p.top_k, p.min_tokens) == (1.0, 0.95, 0, 3)
    finally:
        app.state.server.loop.close()


def test_api_key_overload_and_timeout(ckpt):
    """The API key guards /v1 (a CORS preflight passes without it; the origins allowed: any, or none); a full
    queue answers 503 with Retry-After; a request past the timeout 408."""
    for kw in ({"max_queue": 0}, {"timeout": 0.0}):  # a queue that refuses everything, a request never given time
        with pytest.raises(ValueError, match="max_queue must be >= 1 and timeout > 0"):
            create_app(Engine.from_pretrained(ckpt), "tiny", **kw)
    closed = Live(create_app(Engine.from_pretrained(ckpt, max_batch=1), "tiny", allowed_origins=()))
    try:  # no origin allowed: no CORS headers, a preflight refused
        r = httpx.options(closed.url + "/v1/models", headers={"Origin": "http://app.example",
                                                             "Access-Control-Request-Method": "GET"})
        assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    finally:
        closed.close()
    s = Live(create_app(Engine.from_pretrained(ckpt, max_batch=1), "tiny", api_key="k", max_queue=1))
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            check_error(c.post("/v1/chat/completions", json=body), 401)
            check_error(c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer no"}), 401)
            ok = {"Authorization": "Bearer k"}
            assert c.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
            assert c.get("/health").status_code == 200  # no key needed
            cors = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type"}
            r = c.options("/v1/chat/completions", headers=cors)  # a browser's preflight: answered without the key
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
            r = c.post("/v1/chat/completions", json=body, headers={"Origin": "http://app.example"})
            check_error(r, 401)  # (the key still guards the API; the page may read why)
            assert r.headers["access-control-allow-origin"] == "*"
            engine = s.srv.loop.engine  # (in a thread of this process)
            gate, step = threading.Event(), engine.step
            engine.step = lambda: gate.wait() and step()  # the engine stalls until the gate opens
            first = ThreadPoolExecutor(1).submit(c.post, "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                                 headers=ok)
            deadline = time.time() + 10
            while s.srv.loop.queued() < 1 and time.time() < deadline:
                time.sleep(0.01)
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=ok)
            check_error(r, 503)  # max_queue 1: one request waits, the next is turned away
            assert r.headers["retry-after"] == "1"
            gate.set()
            assert first.result(timeout=30).status_code == 200
            engine.step = step
        s.srv.timeout = 0.05
        with httpx.Client(base_url=s.url, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 240, "ignore_eos": True}, headers=ok)
            check_error(r, 408)
    finally:
        s.close()


def test_engine_process_death_fails_its_requests_and_health(long_ckpt):
    eng = EngineProcess(long_ckpt, max_batch=4, int8=True)  # (and the server's path of --int8)
    s = Live(create_app(eng, "tiny"))
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            body = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                os.kill(eng.proc.pid, signal.SIGKILL)
                rest = [x for x in lines if x.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert "the engine process exited" in json.loads(rest[-2][6:])["error"]["message"]
            check_error(c.get("/health"), 503)
            check_error(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 503)
    finally:
        s.close()
    assert not eng.proc.is_alive()


def test_engine_thread_steps_on_its_own_torch_threads(ckpt):
    """An Engine made in Python steps in a thread of one torch thread (libgomp's second thread team there made
    each op wait for sleeping threads: 5x slower on 2 cores); the caller's threads keep their setting."""
    eng = Engine.from_pretrained(ckpt, max_batch=2)
    seen, step = [], eng.step
    eng.step = lambda: (seen.append(torch.get_num_threads()), step())[1]
    before = torch.get_num_threads()
    s = Live(create_app(eng, "tiny"))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=60)
    finally:
        s.close()
    assert r.status_code == 200 and seen and set(seen) == {1} and torch.get_num_threads() == before


def test_engine_process_that_cannot_start_says_why(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="the engine process could not start"):
        EngineProcess(bad)


@pytest.mark.slow
def test_schemathesis_no_5xx(ckpt):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    app = create_app(Engine.from_pretrained(ckpt, max_batch=16), "tiny")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    try:
        for op in schema.get_all_operations():
            for mode in schemathesis.GenerationMode:  # valid bodies, then invalid ones

                @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
                @given(case=op.ok().as_strategy(mode))
                def run(case):  # (a valid body may ask for 15 x 200 tokens: a few seconds on 2 cores)
                    r = case.call(timeout=60)
                    if r.status_code >= 500:
                        failures.append((case.method, case.path, case.body, r.status_code, r.text[:200]))
                try:
                    run()
                except Unsatisfiable:  # no invalid input exists (GET /health)
                    assert mode == schemathesis.GenerationMode.NEGATIVE
    finally:
        app.state.server.loop.close()
    assert not failures, failures[:3]


def test_chat_page_in_headless_chromium(live, ref, tmp_path):
    if not os.path.exists("/usr/bin/chromium"):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install -y chromium)")
        pytest.skip("no /usr/bin/chromium")
    from playwright.sync_api import sync_playwright
    msgs = [{"role": "user", "content": "What is 12 + 7?"}]
    _, text = greedy(ref, chat_ids(ref, msgs), 20)
    want_reasoning, want_content = split_reasoning(text, True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(live.url + "/")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "20")
        page.fill("#prompt", "What is 12 + 7?")
        page.click("#send")
        page.wait_for_selector(".assistant[data-done='1']", timeout=30000)
        reply = page.locator(".assistant").last
        assert reply.locator(".thinking div").text_content().strip() == want_reasoning  # collapsed panel
        assert reply.locator(".content").text_content().strip() == want_content
        reply.locator(".thinking summary").click()  # expands the reasoning
        assert reply.locator(".thinking div").is_visible()
        page.screenshot(path=str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 1000
        page.reload()  # the conversation is kept in localStorage
        page.wait_for_selector(".user")
        assert page.locator(".user .content").first.text_content() == "What is 12 + 7?"
        browser.close()


def test_sobre_serve_cli_logs_one_line_per_request(ckpt, tmp_path):
    """`sobre serve` with its flags, a LoRA adapter served beside the model (--lora-modules: a request's `model`
    picks it, answering as the adapter merged)."""
    import socket
    import subprocess
    import sys

    from sobre import lora

    from test_lora import randomize_adapters
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = sobre.load(ckpt)
    lora.add_lora(m, rank=2)
    randomize_adapters(m, std=2.0)
    lora.save_adapter(m, tmp_path / "ad", str(ckpt))
    merged = Engine(lora.merge(m), Engine.from_pretrained(ckpt).tokenizer)
    prompt = merged.tokenizer.encode("What is 12 + 7?")
    want = {name: greedy(eng, prompt, 5)[1] for name, eng in (("tiny", Engine.from_pretrained(ckpt)), ("ad", merged))}
    assert want["tiny"] != want["ad"]
    proc = subprocess.Popen([sys.executable, "-m", "sobre", "serve", str(ckpt), "--port", str(port), "--api-key", "k",
                             "--max-batch", "4", "--prefill-chunk", "4", "--allowed-origins", "http://a.example",
                             "--lora-modules", f"ad={tmp_path / 'ad'}"], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Hello world, the answer is 42.",
                                                      "max_tokens": 3},  # (prefilled 4 tokens a step)
                       headers={"Authorization": "Bearer k", "Origin": "http://a.example"})
        assert r.status_code == 200 and r.json()["model"] == "tiny" and r.json()["usage"]["prompt_tokens"] > 4
        assert r.headers["access-control-allow-origin"] == "http://a.example"
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"]
        assert [(x["id"], x.get("parent")) for x in models] == [("tiny", None), ("ad", "tiny")]
        for name in ("tiny", "ad"):
            r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                           json={"model": name, "prompt": prompt, "max_tokens": 5, "temperature": 0})
            assert r.json()["model"] == name and r.json()["choices"][0]["text"] == want[name], r.text
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"model": "nope", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404 and "'ad'" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    lines = [x for x in err.splitlines() if "sobre.serve" in x]
    assert any("POST /v1/completions 200" in x and "prompt=" in x for x in lines), err
    assert any("GET /v1/models 401" in x for x in lines), err
