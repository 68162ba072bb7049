"""The API's routes: /v1/chat/completions, /v1/completions, /v1/models (responses in OpenAI's shapes; chat adds
DeepSeek's `reasoning_content`, also streamed as deltas, and tool calls in DeepSeek's format (sobre.tools);
completions take DeepSeek's fill-in-the-middle `suffix`, also at its /beta/completions), and vLLM's /tokenize and
/detokenize (the token ids those endpoints feed the model, and back)."""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from .chat import END_THINK, THINK
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Function,
    Message,
    NamedTool,
    TokenizeRequest,
)
from .schema import check_schema
from .serve import Server, request_id, split_final, sse
from .tools import CALL_END, CALLS_END, SEP, ToolCallStream, call_prefix, split_tool_calls


def routes(app: FastAPI, srv: Server, auth):
    tok = srv.tok

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [model_card(srv, name) for name in (srv.name, *srv.loop.limits.loras)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[auth])
    async def model(model_id: str):
        return model_card(srv, srv.check_model(model_id))

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(req: ChatRequest, request: Request):
        name = srv.check_model(req.model)
        json_mode = response_json(req)
        tools, forced = tool_setup(req)
        if forced and json_mode:
            raise APIError(400, "response_format with tool_choice required or a named function: the answer is the "
                           "call", param="response_format")
        # the forced call as structured output: a named function's arguments under its parameters; "required": a
        # name, then its arguments under its own (where <｜tool▁sep｜> is one token of the vocabulary, as in
        # DeepSeek's and sobre's: the constraint reads each token's text, and a separator spelled in bytes has
        # none)
        named = isinstance(req.tool_choice, NamedTool) and forced is not None
        schemas = {t.function.name: None if (s := arguments_schema(t.function)) is True else s for t in req.tools} \
            if forced and not named and srv.loop.limits.separator else None
        if named:
            json_mode = arguments_schema(next(t.function for t in req.tools
                                              if t.function.name == req.tool_choice.function.name))
        text = render_chat(tok, req.messages, tools, req.chat_template_kwargs)
        if forced or json_mode:  # the answer starts now, with the call or the object (no reasoning first)
            text += (END_THINK if text.rstrip().endswith(THINK) else "") + (forced or "")
        prompt = tok.encode(text)
        thinking = text.rstrip().endswith(THINK)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        choices = await srv.start([prompt], req.n, lambda n, j: srv.params(req, n, max_tokens, top, j, json_mode,
                                                                           schemas),
                                  thinking, "messages")
        rid, created = request_id("chatcmpl"), int(time.time())
        request.state.prompt_tokens = len(prompt) * req.n
        head = {"id": rid, "created": created, "model": name, "system_fingerprint": "sobre"}

        if not req.stream:
            async for _ in srv.events(choices, request):
                pass
            usage = finish(request, srv, [prompt], req.n, choices)
            out = []
            for c in choices:
                reasoning, content = split_final(c, thinking)
                msg, finish_reason = {"role": "assistant", "content": content}, c.finish_reason
                if reasoning is not None:
                    msg["reasoning_content"] = reasoning
                if forced is not None:
                    closed = CALL_END + CALLS_END if (named or schemas) and call_ended(content, schemas) else ""
                    content, calls = split_tool_calls(forced + content + closed)  # (no call finished: the text)
                    msg["content"] = content
                    if calls:  # (OpenAI's shape: content null when the turn is only calls)
                        msg.update(content=content.strip() or None, tool_calls=calls)
                        finish_reason = "tool_calls"
                out.append({"index": c.index, "message": msg, "finish_reason": finish_reason,
                            "logprobs": srv.chat_logprobs(c.logprobs) if top is not None else None})
            return {**head, "object": "chat.completion", "choices": out, "usage": usage}

        usage = req.stream_options is not None and req.stream_options.include_usage

        def chunk(index, delta, finish=None, logprobs=None):
            obj = {**head, "object": "chat.completion.chunk",
                   "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            return sse({**obj, "usage": None} if usage else obj)

        calling = {c.index: ToolCallStream() for c in choices} if forced is not None else {}
        for s in calling.values():
            s.feed(forced)  # (held: it opens the calls)
        arguments = {c.index: "" for c in choices}  # (a forced call: closed where its arguments end as JSON)

        async def body():
            for c in choices:
                yield chunk(c.index, {"role": "assistant", "content": ""})
            sent_lp = {c.index: 0 for c in choices}
            async for c, text, final in srv.events(choices, request):
                reasoning, content = c.split_delta(text, final)
                lp = None
                if top is not None and len(c.logprobs) > sent_lp[c.index]:
                    lp = srv.chat_logprobs(c.logprobs[sent_lp[c.index]:])
                    sent_lp[c.index] = len(c.logprobs)
                delta, calls, s = {}, [], calling.get(c.index)
                if s is not None:
                    done = s.calls
                    arguments[c.index] += content
                    closed = CALL_END + CALLS_END if final and (named or schemas) and \
                        call_ended(arguments[c.index], schemas) else ""
                    content, calls = s.feed(content + closed)
                    if final:
                        rest, _ = s.flush()
                        content += rest
                    calls = [{"index": done + k, **call} for k, call in enumerate(calls)]
                if reasoning:
                    delta["reasoning_content"] = reasoning
                if content:
                    delta["content"] = content
                if calls:
                    delta["tool_calls"] = calls
                if delta or lp:
                    yield chunk(c.index, delta, logprobs=lp)
                if final:
                    yield chunk(c.index, {}, "tool_calls" if s is not None and s.calls else c.finish_reason)

        return event_stream(body(), lambda: finish(request, srv, [prompt], req.n, choices),
                            {**head, "object": "chat.completion.chunk"} if usage else None)

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest):
        srv.check_model(req.model)
        if req.messages is None:
            ids = tok.encode(req.prompt, add_special_tokens=True)  # (as /v1/completions encodes a text prompt)
        else:
            tools = tool_dicts(req) if req.tools else None
            kw = {"add_generation_prompt": req.add_generation_prompt} | (req.chat_template_kwargs or {})
            ids = tok.encode(render_chat(tok, req.messages, tools, kw))
        out = {"count": len(ids), "max_model_len": srv.context, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [tok.tok.id_to_token(i) for i in ids]
        return out

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest):
        srv.check_model(req.model)
        V = srv.loop.config.vocab_size
        if any(not 0 <= t < V for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {V})", param="tokens")
        return {"prompt": tok.decode(req.tokens)}

    @app.post("/v1/completions", dependencies=[auth])
    @app.post("/beta/completions", dependencies=[auth], include_in_schema=False)  # (DeepSeek's FIM endpoint)
    async def completions(req: CompletionRequest, request: Request):
        name = srv.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (no server-side ranking)", param="best_of")
        prompts = to_prompts(req.prompt, tok, req.suffix)
        choices = await srv.start(prompts, req.n, lambda n, j: srv.params(req, n, req.max_tokens, req.logprobs, j),
                                  False, "prompt")
        rid, created = request_id("cmpl"), int(time.time())
        request.state.prompt_tokens = sum(len(p) for p in prompts) * req.n
        head = {"id": rid, "created": created, "model": name, "system_fingerprint": "sobre"}
        # echo: a text prompt as sent (not the special tokens its encoding added), token ids decoded
        texts = ([req.prompt] if isinstance(req.prompt, str) else req.prompt if isinstance(req.prompt[0], str)
                 else [tok.decode(p) for p in prompts]) if req.echo else [""] * len(prompts)
        echo = {c.index: texts[c.index // req.n] for c in choices}

        if not req.stream:
            async for _ in srv.events(choices, request):
                pass
            usage = finish(request, srv, prompts, req.n, choices)
            out = [{"index": c.index, "text": echo[c.index] + c.full, "finish_reason": c.finish_reason,
                    "logprobs": srv.completion_logprobs(c.logprobs, len(echo[c.index]))
                    if req.logprobs is not None else None} for c in choices]
            return {**head, "object": "text_completion", "choices": out, "usage": usage}

        usage = req.stream_options is not None and req.stream_options.include_usage

        async def body():
            for c in choices:
                if echo[c.index]:
                    yield sse({**head, "object": "text_completion", "choices": [
                        {"index": c.index, "text": echo[c.index], "logprobs": None, "finish_reason": None}]})
            async for c, text, final in srv.events(choices, request):
                obj = {**head, "object": "text_completion", "choices": [
                    {"index": c.index, "text": text, "logprobs": None,
                     "finish_reason": c.finish_reason if final else None}]}
                yield sse({**obj, "usage": None} if usage else obj)

        return event_stream(body(), lambda: finish(request, srv, prompts, req.n, choices),
                            {**head, "object": "text_completion"} if usage else None)


def response_json(req: ChatRequest) -> bool | dict:
    """response_format -> False (text), True (json_object) or the schema of json_schema (sobre.schema's subset)."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return False
    if fmt.type == "json_object":
        return True
    schema = (fmt.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON schema object)",
                       param="response_format.json_schema.schema")
    try:
        check_schema(schema)
    except ValueError as e:
        raise APIError(400, f"response_format json_schema: {e}", param="response_format.json_schema.schema") from None
    return schema


def render_chat(tok, messages: list[Message], tools: list[dict] | None, template_kwargs: dict | None) -> str:
    """A request's conversation through the model's chat template (a template's own error: a 400)."""
    try:
        return tok.apply_chat_template([chat_message(m, i) for i, m in enumerate(messages)],
                                       **({"tools": tools} if tools else {}), **(template_kwargs or {}))
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e), param="messages") from None


def tool_setup(req: ChatRequest) -> tuple[list[dict] | None, str | None]:
    """(the tools the chat template shows, or None; what the answer is parsed for calls after: "" with
    tool_choice "auto", the start of a call the completion is forced to continue with "required" or a named
    function (the call then constrained: arguments_schema, tools.CallPrefix where the vocabulary holds the
    separator); None: no tools)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    if choice == "none":
        return None, None
    tools = tool_dicts(req)
    if isinstance(choice, NamedTool):
        if choice.function.name not in {t.function.name for t in req.tools}:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        return tools, call_prefix(choice.function.name)
    return tools, call_prefix() if choice == "required" else ""


def tool_dicts(req) -> list[dict]:
    """The request's tools as the chat template takes them; a function without parameters takes none (OpenAI's
    omitted parameters: the templates write them as JSON, and had failed on the missing key)."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    for t in tools:
        t["function"].setdefault("parameters", {"type": "object", "properties": {}})
    return tools


def arguments_schema(fn: Function) -> dict | bool:
    """A forced call's arguments as structured output (vLLM guides a forced call's arguments by the function's
    parameters): the function's `parameters` schema, `{}` where it has none, True (any JSON object) where
    sobre.schema cannot enforce the schema (a 400 instead where the function is `strict`)."""
    if fn.parameters is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    try:
        check_schema(fn.parameters)
    except ValueError as e:
        if fn.strict:
            raise APIError(400, f"tools: function {fn.name!r} is strict, and its parameters cannot be enforced: {e}",
                           param="tools") from None
        return True
    return fn.parameters


def call_ended(text: str, schemas: dict | None) -> bool:
    """Did a forced call's text end with its arguments whole, as JSON (not cut short)? text: a named function's
    arguments, or ("required": the functions' schemas given) a name, <｜tool▁sep｜> and the arguments."""
    try:
        json.loads(text.partition(SEP)[2] if schemas else text)
    except ValueError:
        return False
    return True


def chat_message(m: Message, i: int) -> dict:
    """A request message as chat templates take it (developer -> system; tool calls and results kept)."""
    out = {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        for c in out["tool_calls"]:  # (templates write the arguments as text)
            if isinstance(c["function"]["arguments"], dict):
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def finish(request: Request, srv: Server, prompts, n: int, choices) -> dict:
    """A finished request's usage; its completion tokens also go to the request's log line."""
    request.state.completion_tokens = sum(len(c.tokens) for c in choices)
    return srv.usage(prompts, n, choices)


def event_stream(body, done, usage_head: dict | None) -> StreamingResponse:
    """SSE: the body's chunks, then done() (-> usage), sent as a last chunk when the client asked for it
    (usage_head: that chunk's id/object fields), an error event if the request fails midway (timeout, engine
    failure), and the closing [DONE]."""
    async def run():
        try:
            async for piece in body:
                yield piece
            usage = done()
            if usage_head is not None:
                yield sse({**usage_head, "choices": [], "usage": usage})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"
    return StreamingResponse(run(), media_type="text/event-stream")


def model_card(srv: Server, name: str) -> dict:
    """The base model's card, or a LoRA adapter's (its `parent` the base, as vLLM lists them)."""
    parent = {"parent": srv.name} if name != srv.name else {}
    return {"id": name, "object": "model", "created": srv.created, "owned_by": "sobre", "max_model_len": srv.context,
            **parent}


def to_prompts(prompt, tok, suffix: str | None = None) -> list[list[int]]:
    """OpenAI's four prompt forms: text, list of texts, token ids, list of token-id lists. Text gets the
    tokenizer's own special tokens (begin-of-sentence for DeepSeek's), as transformers and vLLM encode it.
    suffix (DeepSeek's FIM completion): each text prompt is the text before the hole, suffix the text after it,
    the model writes the middle (Tokenizer.fim_prompt: PSM with DeepSeek's tokens); text prompts only."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if suffix is not None:
        if not all(isinstance(p, str) for p in prompt):
            raise APIError(400, "suffix (fill in the middle) takes text prompts, not token ids", param="prompt")
        if tok.fim_ids is None:
            raise APIError(400, "suffix: this model's tokenizer has no fill-in-the-middle tokens (<｜fim▁begin｜>, "
                           "<｜fim▁hole｜>, <｜fim▁end｜>)", param="suffix")
    out = [(tok.encode(p, add_special_tokens=True) if suffix is None else tok.fim_prompt(p, suffix))
           if isinstance(p, str) else list(p) for p in prompt]
    if len(out) > 64:
        raise APIError(400, "at most 64 prompts per request", param="prompt")
    if any(not p for p in out):
        raise APIError(400, "prompt must not be empty", param="prompt")
    return out

