"""Structured outputs (OpenAI's response_format {"type": "json_schema"}): a completion constrained to one JSON
object that satisfies a schema, the same way JSON mode is constrained (constrain.JsonPrefix: the engine rejects a
token whose text would leave the language and draws again without it).

`SchemaPrefix` follows JsonPrefix's syntax and checks the schema as the text arrives: an object's keys are among
its `properties` (each once; any key where `additionalProperties` is true or no properties are given), a key being
typed is a prefix of one still allowed, `}` only once every `required` key is there, each value's first character
fits its `type` (a list of types too), an `integer` has no fraction or exponent, a string `enum` / `const` is typed
character by character as one of its values, an array's elements follow `items`; a `,` or key in an object with no
key left to write is refused (it would be a dead end). The subset OpenAI's strict mode
uses; any other keyword (pattern, minimum, anyOf, $ref, ...) is refused by `check_schema`, never ignored.
"""

from __future__ import annotations

import json

from .constrain import DIGITS, JsonPrefix

TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "title",
            "description", "$schema", "default"}  # (title, description, $schema, default: documentation only)
FIRST = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}


def check_schema(schema, where: str = "schema") -> None:
    """ValueError naming the first part of the schema SchemaPrefix cannot enforce (the root must be an object)."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object")
    if where == "schema" and _types(schema) != {"object"}:
        raise ValueError("schema: the top level must be {\"type\": \"object\", ...}")
    extra = sorted(set(schema) - KEYWORDS)
    if extra:
        raise ValueError(f"{where}: keyword {extra[0]!r} is not supported (supported: {', '.join(sorted(KEYWORDS))})")
    bad = _types(schema) - TYPES if "type" in schema else set()
    if bad or "type" in schema and not _types(schema):
        raise ValueError(f"{where}.type: expected one or more of {sorted(TYPES)}")
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}: enum / const must be non-empty strings only")
        if "type" in schema and "string" not in _types(schema):
            raise ValueError(f"{where}: a string enum / const needs a type that allows strings")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"{where}.properties must be an object")
    for key, sub in props.items():
        if '"' in key or "\\" in key:
            raise ValueError(f"{where}.properties: key {key!r} has a quote or backslash")
        check_schema(sub, f"{where}.properties.{key}")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(k not in props for k in required):
        raise ValueError(f"{where}.required must list keys of properties")
    if not isinstance(schema.get("additionalProperties", False), bool):
        raise ValueError(f"{where}.additionalProperties: only true or false is supported")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()


class SchemaPrefix(JsonPrefix):
    def __init__(self, schema: dict):
        check_schema(schema)
        super().__init__()
        self.pending: dict = schema  # the schema of the value that starts next
        self.ctx: list[tuple[dict, frozenset]] = []  # per open container: its schema, an object's keys so far
        self.keybuf = ""  # the object key being typed
        self.enum: tuple[str, ...] | None = None  # a string enum value being typed: its candidates (JSON text)
        self.raw = ""  # ... and its text so far
        self.integer = False  # the number being read must stay an integer

    def _trial(self) -> SchemaPrefix:
        trial = super()._trial()
        trial.ctx = list(self.ctx)  # (the rest is immutable)
        return trial

    def _char(self, ch: str) -> bool:
        s = self.state
        if s == "string" and self.key:  # (no escapes in keys: a key's state stays "string")
            if ch == '"':
                return self._key_done() and super()._char(ch)
            self.keybuf += ch
            return ch != "\\" and (self._free_keys() or any(k.startswith(self.keybuf) for k in self._keys_left())) \
                and super()._char(ch)
        if s in ("string", "escape", "unicode") and self.enum is not None:
            self.raw += ch
            if not any(c.startswith(self.raw) for c in self.enum):
                return False
            if s == "string" and ch == '"':  # (a closing quote: an escaped one is in state "escape")
                if self.raw not in self.enum:
                    return False
                self.enum = None
            return super()._char(ch)
        if s == "number" and self.integer and ch in ".eE":
            return False
        if s in ("key_or_end", "key") and ch == '"':
            if not (self._free_keys() or self._keys_left()):
                return False
            self.keybuf = ""
        if s == "after" and ch == ",":
            if self.stack[-1] == "[":
                self.pending = self.ctx[-1][0].get("items", {})
            elif not (self._free_keys() or self._keys_left()):  # (no key may follow: a dead end)
                return False
        return super()._char(ch)

    def _keys_left(self) -> list[str]:
        schema, used = self.ctx[-1]
        return [k for k in schema.get("properties", {}) if k not in used]

    def _free_keys(self) -> bool:
        """Whether the open object takes keys beyond its properties."""
        schema = self.ctx[-1][0]
        return schema.get("additionalProperties", False) or "properties" not in schema

    def _key_done(self) -> bool:
        schema, used = self.ctx[-1]
        props = schema.get("properties", {})
        if self.keybuf in used or self.keybuf not in props and not self._free_keys():
            return False
        self.ctx[-1] = (schema, used | {self.keybuf})
        self.pending = props.get(self.keybuf, {})
        return True

    def _value(self, ch: str) -> bool:
        p = self.pending
        if ch == "]" and self.stack[-1] == "[" and self.sub == "first":
            return super()._value(ch)  # an empty array
        kind = FIRST.get(ch, "number" if ch == "-" or ch in DIGITS else None)
        types = _types(p)
        if types and not (kind in types or kind == "number" and "integer" in types):
            return False
        self.integer = kind == "number" and "number" not in types and "integer" in types
        if "enum" in p or "const" in p:
            if ch != '"':
                return False
            self.enum = tuple(json.dumps(v, ensure_ascii=False) for v in (p["enum"] if "enum" in p else [p["const"]]))
            self.raw = ch
        return super()._value(ch)

    def _open(self, ch: str) -> bool:
        self.ctx.append((self.pending, frozenset()))
        if ch == "[":
            self.pending = self.pending.get("items", {})
        return super()._open(ch)

    def _close(self, ch: str) -> bool:
        if not self.ctx:
            return False
        schema, used = self.ctx[-1]
        if ch == "}" and not set(schema.get("required", ())) <= used:
            return False
        self.ctx.pop()
        return super()._close(ch)

