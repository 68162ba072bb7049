"""The OpenAI / DeepSeek API's request bodies (pydantic, so bad input is a 4xx with the field named) and its
error body {"error": {"message", "type", "param", "code"}}.

Unknown fields are ignored (clients send vendor extras). sobre's extras, as in vLLM: top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, include_stop_str_in_output, chat_template_kwargs
(e.g. {"thinking": false}).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

MAX_N = 16  # completions per request
MAX_STOP = 4  # stop strings per request (as OpenAI)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share."""
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)  # tokens before a stop token or string may end a completion
    stop_token_ids: list[int] | None = Field(None, max_length=64)  # more stop tokens (kept with ignore_eos)
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are: a string) -> bias in [-100, 100]

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if not all(k.isdigit() for k in v):
            raise ValueError("logit_bias keys must be token ids")
        if not all(-100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str = Field(min_length=1)
    arguments: str | dict  # JSON text, as the model wrote it (some clients send back the object itself)


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Function(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class NamedTool(BaseModel):
    class Name(BaseModel):
        name: str

    type: Literal["function"]
    function: Name


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # sent back by DeepSeek API clients; dropped from the prompt, as there
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool result's call

    def text(self, i: int) -> str:
        if self.content is None:
            if self.role == "assistant":
                return ""
            raise APIError(400, f"messages[{i}].content is required for role {self.role!r}",
                           param=f"messages.{i}.content")
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{i}]: content part type {part.type!r} is not supported "
                               "(text only)", param=f"messages.{i}.content")
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool = True  # (accepted; the model decides how many calls it writes)
    response_format: ResponseFormat | None = None  # text, json_object, or json_schema (sobre.schema's subset)
    chat_template_kwargs: dict | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):  # (as OpenAI: the alternatives come with the chosen tokens' logprobs)
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a completion's text prompt, or a conversation rendered as /v1/chat/completions renders it."""
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) and messages (a conversation)")
        return self


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
