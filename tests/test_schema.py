"""Structured outputs (response_format json_schema): SchemaPrefix against a reference validator on valid, mutated
and random texts; unsupported keywords refused; the engine's constrained decoding ends on a valid object."""

import json
import random
import time

import jsonschema_rs
import pytest
import torch

import sobre
from sobre.engine import Engine
from sobre.sampling import SamplingParams
from sobre.schema import TYPES, Schema, SchemaPrefix, check_schema
from sobre.tokenizer import train_tokenizer

from conftest import random_model

PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "number"}},
       "required": ["kind"]}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": ["boolean", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", 'b"c', "é"]}},
    "pets": {"type": "array", "items": PET}, "any": {}, "extra": {"type": "object", "additionalProperties": True}},
    "required": ["name", "n"], "additionalProperties": False}


def closed(schema):
    """The schema with sobre's one convention spelled out for the reference: an object with properties (or
    patternProperties) and no additionalProperties takes no other key (OpenAI's strict mode asks for
    additionalProperties false)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in ("items", "additionalProperties", "anyOf", "allOf") else
           {n: closed(v2) for n, v2 in v.items()} if k in ("properties", "patternProperties", "$defs") else v
           for k, v in schema.items()}
    closes = ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out
    return out | ({"additionalProperties": False} if closes else {})


def valid(value, schema) -> bool:
    """The reference: jsonschema-rs (JSON Schema 2020-12)."""
    key = json.dumps(schema, sort_keys=True)
    if key not in VALIDATORS:
        VALIDATORS[key] = jsonschema_rs.validator_for(closed(schema), validate_formats=True)
    return VALIDATORS[key].is_valid(value)


VALIDATORS = {}


def parse(text):
    """json.loads, refusing repeated keys (a schema's object names each key once)."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(keys) != len(set(keys)):
            raise ValueError("repeated key")
        return dict(items)
    return json.loads(text, object_pairs_hook=pairs)


def run(text, schema=SCHEMA):
    """(every character accepted, complete after the last)."""
    p = SchemaPrefix(schema)
    return all(p.accepts(c) and p.feed(c) for c in text), p.complete


class Compact:
    """An enum / const value in a sampled object: sobre writes it as compact JSON."""

    def __init__(self, value):
        self.value = value


def dump(value, separators) -> str:
    """json.dumps with separators, Compact values compact."""
    if isinstance(value, Compact):
        return json.dumps(value.value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, dict):
        return "{" + separators[0].join(json.dumps(k, ensure_ascii=False) + separators[1] + dump(v, separators)
                                         for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + separators[0].join(dump(v, separators) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def sample_value(rng, schema, depth=0, root=None):
    """A random value that satisfies the schema (enum / const values as sobre writes them: compact JSON)."""
    root = root or schema
    if "$ref" in schema:
        return sample_value(rng, Schema(root).resolve(schema["$ref"], "test"), depth, root)
    if "anyOf" in schema or "allOf" in schema:
        return sample_value(rng, rng.choice(schema.get("anyOf") or schema["allOf"]), depth, root)
    if "examples" in schema:
        return rng.choice(schema["examples"])
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        return Compact(rng.choice([v for v in values if valid(v, {"type": schema.get("type", list(TYPES))})]))
    types = schema.get("type", rng.choice(["string", "integer", "array", "object", "null"] if depth < 2 else ["null"]))
    t = rng.choice(types) if isinstance(types, list) else types
    if t == "object":
        props = schema.get("properties", {})
        keys = [k for k in props if k in schema.get("required", ()) or rng.random() < 0.5]
        out = {k: sample_value(rng, props[k], depth + 1, root) for k in keys}
        extra = schema.get("additionalProperties", "properties" not in schema)
        if extra is not False:
            extra = extra if isinstance(extra, dict) else {}
            out.update({f"k{i}": sample_value(rng, extra, depth + 1, root) for i in range(rng.randrange(3))})
        return dict(rng.sample(list(out.items()), len(out)))
    if t == "array":
        n = min(schema.get("maxItems", 2), max(schema.get("minItems", 0), rng.randrange(3 if depth < 3 else 1)))
        return [sample_value(rng, schema.get("items", {}), depth + 1, root) for _ in range(n)]
    return {"string": lambda: rng.choice(["", "x", 'q"\\u', "日本"]), "integer": lambda: rng.randrange(-50, 50),
            "number": lambda: rng.choice([0, -3, 2.5, 1e-3]), "boolean": lambda: rng.random() < 0.5,
            "null": lambda: None}[t]()


@pytest.mark.parametrize("text,ok", [
    ('{"name": "x", "n": 3}', True),
    ('{ "n" : -12 , "name":"y", "tags": ["a", "b\\"c", "é"], "ok": null, "pets": [{"age": 2.5, "kind": "dog"}],'
     ' "any": [1, {"z": null}], "extra": {"q": 1}}', True),
    ('{"name": "x"}', False), ('{"name": "x", "n": 3.5}', False), ('{"name": "x", "n": 1e3}', False),
    ('{"name": "x", "n": 3, "n": 4}', False), ('{"nam": "x", "n": 3}', False),
    ('{"name": "x", "n": 3, "zz": 1}', False),
    ('{"name": 1, "n": 3}', False), ('{"name": "x", "n": 3, "tags": ["c"]}', False),
    ('{"name": "x", "n": 3, "tags": ["ab"]}', False), ('{"name": "x", "n": 3, "tags": ["ab', False),
    ('{"name": "x", "n": 3, "pets": [{}]}', False),
    ('{"name": "x", "n": 3, "ok": 1}', False), ('{"name": "x", "n": 3, "tags": []}', True), ('[]', False),
    ('{"name": "x", "n": 3, "ok": true, "tags": [], "pets": [], "any": 1, "extra": {}}', True),
    ('{"name": "x", "n": 3, "ok": true, "tags": [], "pets": [], "any": 1, "extra": {},', False),
    ('{"na', None), ('{"name": "x", "n": 3, "tags": ["b\\"', None)])
def test_schema_prefix_cases(text, ok):
    """ok: a valid object, complete at its end; None: a valid unfinished prefix; False: refused at the character
    where no object the schema allows goes on (a key or enum value no allowed one starts with, at once)."""
    fed, done = run(text)
    if ok:
        assert fed and done and valid(parse(text), SCHEMA)
    else:
        assert fed and not done if ok is None else not fed


COLOR = {"enum": ["red", "re", 1, 12, -2.5, 1e20, None, True, [], {}], "title": "Color"}
TREE = {  # what pydantic writes: $defs and $ref (recursive), anyOf, enums of any JSON value, bounds on arrays
    "$defs": {"Node": {"type": "object", "properties": {"name": {"type": "string"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}}, "required": ["name", "kids"],
        "additionalProperties": False}, "Color": COLOR},
    "type": "object", "properties": {
        "tree": {"$ref": "#/$defs/Node"}, "color": {"$ref": "#/$defs/Color"}, "default": {"default": None},
        "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}, {"const": "n/a"},
                            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                            {"type": "object", "properties": {"ab": {"const": {"x": [1, 2]}}},
                             "additionalProperties": {"type": "boolean"}}], "default": None},
        "pair": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3},
        "free": {"type": "object", "properties": {"p": {"type": "null"}}, "additionalProperties": {}},
        "scores": {"type": "object", "additionalProperties": {"type": "number"}},
        "wrapped": {"allOf": [{"$ref": "#/$defs/Color"}], "description": "one of the colours"},
        "tags": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"enum": ["a", 3], "type": "string"}]}},
        "self": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["tree", "color", "maybe", "pair"], "additionalProperties": False}
BASE = '"tree": {"name": "r", "kids": []}, "color": "red", "pair": ["x", "y"]'
T = '{"tree": {"name": "r", "kids": []}, '


@pytest.mark.parametrize("text,ok", [
    ('{' + BASE + ', "maybe": null}', True), ('{' + BASE + ', "maybe": -4}', True),
    ('{' + BASE + ', "maybe": "n/a"}', True), ('{' + BASE + ', "maybe": "n/b"}', False),
    ('{' + BASE + ', "maybe": {"a": "x"}}', True), ('{' + BASE + ', "maybe": {"a": true}}', True),
    ('{' + BASE + ', "maybe": {"ab": {"x":[1,2]}, "a": false}}', True),
    ('{' + BASE + ', "maybe": {"ab": {"x": [1, 2]}}}', False),  # (an enum value is written compact)
    ('{' + BASE + ', "maybe": {"a": 1}}', False), ('{' + BASE + ', "maybe": {"b": true}}', True),
    ('{' + BASE + ', "maybe": {"b": "x"}}', False), ('{' + BASE + ', "maybe": {}}', True),
    ('{' + BASE + ', "maybe": 1.5}', False), ('{' + BASE + ', "maybe": {"a": "x", "b": 1}}', False),
    ('{"tree": {"name": "r", "kids": [{"name": "s", "kids": [{"name": "t", "kids": []}]}]}, "color": 12, '
     '"maybe": null, "pair": ["x", "y", "z"]}', True),
    ('{"tree": {"name": "r", "kids": [{"name": "s", "kids": []}, {"name": "t", "kids": []}, ', False),  # maxItems
    ('{"tree": {"name": "r", "kids": [{"name": "s"}]}', False), (T + '"color": "red", "pair": []', False),  # minItems
    (T + '"color": "red", "pair": ["x"]', False),
    ('{' + BASE + ', "maybe": null, "free": {"p": null, "q": [{}]}}', True),
    (T + '"color": "red", "pair": ["x", "y", "z",', False), ('{' + BASE + ', "maybe": 1, "color": "red"}', False),
    (T + '"color": 1, "maybe": null, "pair": ["x", "y"]}', True),
    (T + '"color": 1e+20, "maybe": null, "pair": ["x", "y"]}', True),
    (T + '"color": 123', False), (T + '"color": 2', False), (T + '"color": "r', None), (T + '"color": "rex', False),
    (T + '"color": {}, "maybe": null, "pair": ["x", "y"], "wrapped": [], "default": [{}]}', True),
    ('{' + BASE + ', "maybe": null, "wrapped": "blue"}', False),
    ('{' + BASE + ', "maybe": null, "tags": ["a", "b", "a"], "scores": {"u": 1.5, "v": -2}}', True),
    ('{' + BASE + ', "maybe": null, "tags": [3]}', False),
    ('{' + BASE + ', "maybe": null, "scores": {"u": "x"}}', False),
    ('{' + BASE + ', "maybe": null, "self": {' + BASE + ', "maybe": 2, "self": null}}', True),
    ('{' + BASE + ', "maybe": null, "self": {"tree": 1', False)])
def test_schema_prefix_alternatives_and_references(text, ok):
    """anyOf forks the reading (objects whose keys share a prefix, a const, types), $ref reaches $defs and the
    root (recursion), enum / const values of every JSON type, minItems / maxItems, additionalProperties as a
    schema."""
    fed, done = run(text, TREE)
    if ok:
        assert fed and done and valid(parse(text), TREE), text
    else:
        assert (fed and not done if ok is None else not fed), text


SCALARS = {"type": "object", "properties": {  # (examples: what sample_value writes)
    "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$", "examples": ["AB-123", "ZZ-000"]},
    "word": {"type": "string", "pattern": "ab+c", "minLength": 4, "maxLength": 8, "examples": ["abc!", "xabbc"]},
    "day": {"type": "string", "format": "date", "examples": ["2024-02-29", "1999-12-31"]},
    "at": {"type": "string", "format": "date-time",
           "examples": ["2024-01-01T12:30:00Z", "2024-01-01t00:00:59.25+05:30"]},
    "time": {"type": "string", "format": "time", "examples": ["23:59:59-01:00"]},
    "mail": {"type": "string", "format": "email", "examples": ["a.b@c.org", "x+y@mail.example.com"]},
    "id": {"type": "string", "format": "uuid", "examples": ["123e4567-e89b-12d3-a456-426614174000"]},
    "ip": {"type": "string", "format": "ipv4", "examples": ["10.0.0.255", "192.168.1.1"]},
    "ip6": {"type": "string", "format": "ipv6", "examples": ["::1", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"]},
    "host": {"type": "string", "format": "hostname", "examples": ["example.com", "a-b.c0", "localhost"]},
    "dur": {"type": "string", "format": "duration", "examples": ["P1Y2M3DT4H5M6S", "PT15M", "P2W"]},
    "short": {"type": "string", "maxLength": 2, "examples": ["\n\u00e9", "\U0001F600", ""]},
    "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 130, "examples": [18, 129, 64]},
    "temp": {"type": "number", "minimum": -40.5, "maximum": 60, "examples": [-40.5, 0, 59.99, 60]},
    "p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "examples": [0.001, 1, 0.5]},
    "neg": {"type": "integer", "maximum": -10, "examples": [-10, -12345]},
    "either": {"type": ["string", "integer"], "minLength": 2, "minimum": 5, "examples": ["ab", 7]},
    "both": {"minimum": 1, "exclusiveMinimum": 2, "maximum": 3, "exclusiveMaximum": 2.5, "examples": [2.2, 2.499]},
    "even": {"type": "integer", "multipleOf": 2, "minimum": -7, "examples": [-6, 0, 42]},
    "tenth": {"type": "number", "multipleOf": 0.1, "maximum": 1, "examples": [0.3, 1, -2.7, 0]},
    "fives": {"type": "integer", "multipleOf": 2.5, "examples": [5, -10, 0]}},  # (integers: multiples of 5)
    "required": ["code", "age"], "additionalProperties": False}
C = '{"code": "AB-123", "age": 20, '


@pytest.mark.parametrize("text,ok", [
    ('{"code": "AB-123", "age": 18}', True), ('{"code": "AB-12"', False), ('{"code": "Ab', False),
    ('{"code": "AB-123", "age": 17', False), ('{"code": "AB-123", "age": 13', False),
    ('{"code": "AB-123", "age": 1e2', False), ('{"code": "AB-123", "age": -', False),
    ('{"code": "AB-123", "age": 129}', True), ('{"code": "AB-123", "age": 13', False),
    (C + '"temp": -40.5}', True), (C + '"temp": -40.6', False), (C + '"temp": -41', False), (C + '"temp": 60.0}', True),
    (C + '"temp": 60.5', False), (C + '"temp": 6', None), (C + '"p": 0}', False), (C + '"p": 0.0001}', True),
    (C + '"p": -0.5', False), (C + '"p": 1.5', False), (C + '"neg": -9', None), (C + '"neg": -9}', False),
    (C + '"neg": -90}', True), (C + '"neg": 0', False),
    (C + '"day": "2024-02-29"}', True), (C + '"day": "2023-02-29', False), (C + '"day": "2024-13', False),
    (C + '"day": "٢', False),  # (an Arabic-Indic digit: formats take ASCII digits only)
    (C + '"at": "2024-01-01T25', False), (C + '"at": "2024-01-01T12:30:00"', False),
    (C + '"at": "2024-01-01T12:30:00+01:00"}', True), (C + '"time": "12:00:00Z"}', True),
    (C + '"mail": "a..b', False), (C + '"mail": "a@b"', False), (C + '"mail": "a@b.c"}', True),
    (C + '"ip": "256', False), (C + '"ip": "1.2.3.4"}', True), (C + '"ip6": "1::2::', False),
    (C + '"ip6": "fe80::1"}', True), (C + '"ip6": "12345', False), (C + '"ip6": "::ffff:1.2.3.256', False),
    (C + '"host": "-a', False), (C + '"host": "a..', False), (C + '"host": "ab--', False), (C + '"host": "a.b"}', True),
    (C + '"host": "a."', False), (C + '"dur": "P1H', False), (C + '"dur": "PT"', False), (C + '"dur": "P1DT2H"}', True),
    (C + '"dur": "P1W2', False),
    (C + '"id": "123e4567-e89b-12d3-a456-42661417400"', False),
    (C + '"word": "abc"', False), (C + '"word": "xxabbcx"}', True), (C + '"word": "abd!"', False),
    (C + '"word": "abcdefghi', False),
    (C + '"short": "\\ud83d\\ude00\\u00e9"}', True), (C + '"short": "\\n\\t"}', True), (C + '"short": "abc', False),
    (C + '"either": "a"', False), (C + '"either": "ab"}', True), (C + '"either": 4}', False),
    (C + '"either": 5}', True), (C + '"both": 1.5', False), (C + '"both": 2}', False), (C + '"both": 2.5', False),
    (C + '"both": 2.4}', True), (C + '"both": 3', False),
    (C + '"even": 3', None), (C + '"even": 3}', False), (C + '"even": 36}', True), (C + '"even": -8', False),
    (C + '"even": -6}', True), (C + '"even": 4.', False), (C + '"tenth": 0.35', False), (C + '"tenth": 0.3}', True),
    (C + '"tenth": 0.30}', True), (C + '"tenth": 1.1', False), (C + '"tenth": -2.7}', True),
    (C + '"tenth": 0.}', False), (C + '"fives": 7', None), (C + '"fives": 7}', False), (C + '"fives": 15}', True),
    (C + '"fives": 2.5', False)])
def test_schema_prefix_strings_and_numbers(text, ok):
    """pattern (searched), format (calendar days checked), minLength / maxLength in code points (escapes and
    surrogate pairs decoded), minimum / maximum / exclusive bounds and multipleOf (exact: 0.3 is a multiple of
    0.1) refused at the first digit no number within them (and a multiple) starts with."""
    fed, done = run(text, SCALARS)
    if ok:
        assert fed and done and valid(parse(text), SCALARS), text
    else:
        assert (fed and not done if ok is None else not fed), text


def test_formats_against_the_reference_validator():
    """Each format against jsonschema-rs on valid texts with 0-2 random edits from the format's own characters,
    and random IPv6 addresses (compressed, exploded, IPv4-mapped), a text taken when it and each of its prefixes
    are viable (as decoding checks them) and it is done: every text taken is valid; for ipv4 / ipv6 / uuid /
    duration / hostname every valid text is taken, but hostnames with an IDNA A-label ("xn--" + punycode, which
    the reference decodes). (The reference is looser elsewhere: it takes 1-99-12-31 as a date, 12:3-:00 in a
    time, and a dotless email domain.)"""
    import ipaddress

    from sobre.scalars import FORMATS, Text
    rng = random.Random(0)
    seeds = {"date": ["2024-02-29", "1999-12-31"], "time": ["23:59:59Z", "00:00:00.5+05:30"],
             "date-time": ["2024-01-01T12:30:00Z", "2023-02-28t00:00:59.25-01:00"],
             "uuid": ["123e4567-e89b-12d3-a456-426614174000"], "duration": ["P1Y2M3DT4H5M6S", "PT15M", "P2W", "P3D"],
             "email": ["a.b@c.org", "x+y@mail.example.com"], "hostname": ["example.com", "a-b.c0", "xn--a.b"],
             "ipv4": ["10.0.0.255", "192.168.1.1"], "ipv6": ["::1", "2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"]}
    assert set(seeds) == set(FORMATS)
    for fmt, texts in seeds.items():
        ref, ours, valid_seen = jsonschema_rs.validator_for({"format": fmt}, validate_formats=True), Text(
            {"format": fmt}, "x"), 0
        alphabet = sorted(set("".join(texts)) | set("-."))
        for _ in range(3000):
            text = rng.choice(texts)
            for _ in range(rng.choice([0, 1, 1, 2])):
                i = rng.randrange(len(text) + 1)
                text = text[:i] + rng.choice(alphabet + [""]) + text[i + rng.choice([0, 1]):]
            if fmt == "ipv6" and rng.random() < 0.3:
                a = ipaddress.IPv6Address(rng.getrandbits(128) >> rng.choice([0, 64, 112, 128]))
                text = rng.choice([a.compressed, a.exploded, f"::ffff:{ipaddress.IPv4Address(rng.getrandbits(32))}"])
            want, got = ref.is_valid(text), ours.done(text) and all(ours.viable(text[:i]) for i in range(len(text) + 1))
            valid_seen += want
            assert want or not got, (fmt, text)  # every text written is valid
            if fmt in ("ipv4", "ipv6", "uuid", "duration", "hostname"):  # ... and, where the reference is exact,
                assert got == want or fmt == "hostname" and "xn--" in text.lower(), (fmt, text)  # every valid one
        assert valid_seen >= 300, fmt


def test_a_pattern_that_backtracks_exponentially_is_bounded(monkeypatch):
    """(a|aa)+$ on 40 a's and a '!' would search for hours: the request's pattern time (PATTERN_SECONDS) runs
    out, the character is refused, and so is every later one of that string."""
    import sobre.scalars
    monkeypatch.setattr(sobre.scalars, "PATTERN_SECONDS", 0.2)
    p = SchemaPrefix({"type": "object", "properties": {"r": {"type": "string", "pattern": "(a|aa)+$"}}})
    assert p.feed('{"r": "' + "a" * 40)
    start = time.perf_counter()
    assert not p.accepts("!") and not p.accepts("a") and time.perf_counter() - start < 5


@pytest.mark.parametrize("schema,n", [(SCHEMA, 1000), (TREE, 500), (SCALARS, 1000)], ids=["flat", "tree", "scalars"])
def test_schema_prefix_against_the_reference_validator(schema, n):
    """Random valid objects, written with random whitespace, are accepted to the end; random edits of them are
    accepted and complete only when jsonschema-rs parses and validates them (n of each)."""
    rng = random.Random(0)
    edits = list('{}[]",:0123456789.-e tfnul"xaébkABT@') + ['"name"', '"n"', '"zz"', '"dog"', '"kids"', '"a"', "null",
                                                           "\\n", "\\u00e9"]
    for _ in range(n):
        text = dump(sample_value(rng, schema), rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]))
        assert valid(json.loads(text), schema) and run(text, schema) == (True, True), text
        pos = rng.randrange(len(text) + 1)
        cut = pos + rng.choice([0, 1, 1, 2])
        mutated = text[:pos] + rng.choice(edits + [""]) + text[cut:]
        fed, done = run(mutated, schema)
        if fed and done:
            assert valid(parse(mutated), schema), mutated


def test_pydantic_models():
    """The schemas pydantic writes (model_json_schema, and OpenAI's strict form of them, which the openai
    client's parse() sends) are accepted; objects pydantic dumps are read to the end, edits it would refuse are
    refused."""
    import enum
    from typing import Annotated, Literal

    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel, Field

    class Color(enum.Enum):
        red, blue = "red", "blue"

    class Node(BaseModel):
        name: str
        kids: list["Node"]

    class Step(BaseModel):
        explanation: str
        output: int | None = None
        color: Color
        kind: Literal["a", "b"]
        tree: Node
        scores: dict[str, float]
        tags: set[str]
        marks: dict[Literal["math", "code"], int]  # (propertyNames: an enum)
        notes: dict[Annotated[str, Field(pattern="^[a-z]+$")], str] = Field(min_length=1, max_length=2)

    good = Step(explanation="x", output=None, color=Color.blue, kind="b", tree=Node(name="r", kids=[
        Node(name="s", kids=[])]), scores={"u": 1.5}, tags={"t"}, marks={"code": 2}, notes={"ab": "c"})
    text = good.model_dump_json()
    bad = [text.replace('"output":null', '"output":1.5'), text.replace('"blue"', '"green"'),
           text.replace('"kind":"b"', '"kind":"c"'), text.replace('{"u":1.5}', '{"u":"1"}'),
           text.replace('{"name":"r",', '{'), text.replace('"kind":"b",', ''), text.replace('["t"]', '["t","t"]'),
           text.replace('{"code":2}', '{"cod":2}'), text.replace('{"ab":"c"}', '{}'),
           text.replace('{"ab":"c"}', '{"ab":"c","b":"d","c":"e"}'), text.replace('{"ab":"c"}', '{"aB":"c"}')]
    assert len(set(bad)) == len(bad) and text not in bad
    for schema in (Step.model_json_schema(), to_strict_json_schema(Step)):
        check_schema(schema)
        for t in (text, good.model_dump_json(indent=2)):
            assert run(t, schema) == (True, True) and Step.model_validate_json(t) == good
        for t in bad:
            assert run(t, schema) != (True, True), t


def test_discriminated_unions():
    """pydantic's discriminated unions (oneOf + discriminator, each alternative requiring its own const tag) read
    as anyOf, since no value satisfies two alternatives; a oneOf whose alternatives may overlap is refused
    (test_unsupported_schemas_are_refused)."""
    from typing import Literal

    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel, Field

    class Cat(BaseModel):
        pet_type: Literal["cat"]
        meows: int

    class Dog(BaseModel):
        pet_type: Literal["dog"]
        barks: float

    class Owner(BaseModel):
        pet: Cat | Dog = Field(discriminator="pet_type")
        pets: list[Cat | Dog]

    text = Owner(pet=Dog(pet_type="dog", barks=2.5), pets=[Cat(pet_type="cat", meows=3)]).model_dump_json()
    for schema in (Owner.model_json_schema(), to_strict_json_schema(Owner)):
        assert "oneOf" in json.dumps(schema)
        assert run(text, schema) == (True, True)
        for bad in (text.replace('"barks":2.5', '"meows":2'), text.replace('"dog"', '"cow"'),
                    text.replace('"meows":3', '"meows":3.5'), text.replace('"pet_type":"dog",', "")):
            assert bad != text and run(bad, schema) != (True, True) and not valid(parse(bad), schema), bad


def test_readings_stay_few():
    """Alternatives that accept the same text merge again: an array of anyOf items keeps at most two readings."""
    p = SchemaPrefix(TREE)
    for piece in ['{"tags": ['] + ['"a", "b", '] * 100 + ['"a"]']:
        assert p.feed(piece) and len(p.readings) <= 2


@pytest.mark.parametrize("schema,says", [
    ({"type": "array"}, "top level must be"), ({"anyOf": [{"type": "object"}, {"type": "null"}]}, "top level must be"),
    ({"type": "object", "properties": {"a": {"pattern": "("}}}, "not a regular expression"),
    ({"type": "object", "properties": {"a": {"format": "uri"}}}, "format 'uri' is not supported"),
    ({"type": "object", "properties": {"a": {"minLength": 3, "maxLength": 2}}}, "minLength > maxLength"),
    ({"type": "object", "properties": {"a": {"minLength": -1}}}, "an integer >= 0"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1.2, "maximum": 1.8}}}, "no integer"),
    ({"type": "object", "properties": {"a": {"minimum": 2, "exclusiveMaximum": 2}}}, "no number"),
    ({"type": "object", "properties": {"a": {"exclusiveMinimum": True}}}, "a finite number"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 0}}}, "multipleOf must be > 0"),
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 5, "minimum": 11, "maximum": 14}}},
     "no integer lies within its bounds that is a multiple of 5"),
    ({"type": "object", "propertyNames": {"type": "integer"}}, "as a string schema"),
    ({"type": "object", "propertyNames": {"items": {}}}, "as a string schema"),
    ({"type": "object", "propertyNames": {"enum": ["a", 1]}}, "enum / const of strings"),
    ({"type": "object", "propertyNames": {"enum": ["a"], "maxLength": 3}}, "enum / const of strings, alone"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a"], "propertyNames": {"pattern": "^b"}},
     "key 'a' does not satisfy propertyNames"),
    ({"type": "object", "minProperties": 2, "maxProperties": 1}, "minProperties <= maxProperties"),
    ({"type": "object", "maxProperties": -1}, "integers >= 0"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1},
     "below the 2 required keys"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "minProperties": 3}, "may hold only 2 keys"),
    ({"type": "object", "properties": {"a": {}, "bb": {}}, "propertyNames": {"maxLength": 1}, "minProperties": 2},
     "may hold only 1 keys"),
    ({"type": "object", "patternProperties": {"(a": {}}}, "not a regular expression"),
    ({"type": "object", "patternProperties": ["^a"]}, "patternProperties must be an object"),
    ({"type": "object", "patternProperties": {"^a": {"type": "text"}}}, "expected one or more"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "null"}]}}}, "discriminated union"),
    ({"type": "object", "properties": {"a": {"oneOf": [  # (both may be "x": they overlap)
        {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]}]}}}, "discriminated union"),
    ({"type": "object", "properties": {"a": {"oneOf": [  # (k may be left out of the first)
        {"type": "object", "properties": {"k": {"const": "y"}}},
        {"type": "object", "properties": {"k": {"const": "x"}}, "required": ["k"]}]}}}, "discriminated union"),
    ({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"const": "x"}]}}}, "'type' beside 'anyOf'"),
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "non-empty list"),
    ({"type": "object", "properties": {"a": {"allOf": [{}, {}]}}}, "of one schema"),
    ({"type": "object", "properties": {"a": {"$ref": "https://x.org/s.json"}}}, "only references inside"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/B"}}}, "names nothing"),
    ({"type": "object", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}},
      "properties": {"a": {"$ref": "#/$defs/A"}}}, "cycle"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "non-empty list"),
    ({"type": "object", "properties": {"a": {"const": float("nan")}}}, "NaN"),
    ({"type": "object", "properties": {"a": {"type": "null", "enum": ["x"]}}}, "could never be written"),
    ({"type": "object", "properties": {"a": {"enum": ["x"], "items": {}}}}, "'items' beside 'enum'"),
    ({"type": "object", "required": ["b"]}, "required must list"),
    ({"type": "object", "additionalProperties": 3}, "must be a JSON object"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 2}}}, "minItems <= maxItems"),
    ({"type": "object", "properties": {"a\u0001": {}}}, "control character"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "expected one or more")])
def test_unsupported_schemas_are_refused(schema, says):
    with pytest.raises(ValueError, match=says):
        check_schema(schema)
    with pytest.raises(ValueError, match="sampling parameter json_schema"):
        SamplingParams(json_schema=schema)


def test_engine_decodes_objects_the_schema_allows(tmp_path):
    """A head that prefers a script writing a key the schema does not have and leaving a required one out: greedy
    writes the allowed keys and closes only once the required one is in; sampled rows end on valid objects."""
    tok = train_tokenizer(['{"name": "x", "n": 12, "tags": ["a"], "ok": true}', "Hello world, 42."] * 20,
                          vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    script = tok.encode('{"name": "x", "zz": 1}')

    class Prefers(torch.nn.Module):  # end-of-sentence, then the script's next token, then everything else
        def forward(self, h):
            logits = torch.randn(*h.shape[:-1], tok.vocab_size, generator=gen)
            logits[..., [tok.eos_id, script[min(len(steps), len(script) - 1)]]] = torch.tensor([20., 10.])
            steps.append(0)
            return logits

    head, steps, gen = model.head, [], torch.Generator().manual_seed(0)
    model.head = Prefers()
    out = Engine(model, tok).generate([[5, 6]], max_new_tokens=60, json_schema=schema,
                                      stop_token_ids=(tok.eos_id,))[0]
    text = tok.decode(out)
    assert text.startswith('{"name": "x"') and valid(parse(text), schema) and "zz" not in parse(text), text
    model.head = head
    sampled_objects(Engine(model, tok), schema, 40)


def sampled_objects(eng: Engine, schema: dict, max_new_tokens: int) -> int:
    """Four sampled rows under the schema: each a valid object, or cut short (finish_reason "length") on a prefix
    of one; how many ended on their own."""
    rids = [eng.add_request([5, 6 + i], max_new_tokens=max_new_tokens, json_schema=schema, temperature=1.0, seed=i)
            for i in range(4)]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    for r in rids:
        text = eng.tokenizer.decode(done[r].out, skip_special=True)  # (a dead end: end-of-sentence last)
        fed, complete = run(text, schema)
        assert fed and (done[r].finish_reason == "length" or complete and valid(parse(text), schema)), text
    return sum(done[r].finish_reason != "length" for r in rids)


def test_engine_decodes_pattern_properties(tmp_path):
    """Sampled rows under anchored patternProperties (short keys: a random model ends them) end on objects the
    reference finds valid."""
    schema = {"type": "object", "patternProperties": {"^x_[a-z]?$": {"enum": ["q", 7]}, "^n[0-9]$": {"type": "null"}},
              "properties": {"id": {"type": "integer", "maximum": 9}}, "required": ["id"]}
    tok = train_tokenizer(['{"id": 3, "x_ab": "q", "b_n": -1.5}', "Hello world, 42."] * 20, vocab_size=300,
                          out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    assert sampled_objects(Engine(model, tok), schema, 80)  # (objects closed, not only cut short)


def test_a_key_written_already_is_typed_again_only_as_the_start_of_a_longer_one():
    """A key prefix equal to a key the object holds is refused where no longer key may follow it (its closing
    quote would be a dead end: the key cannot repeat); where one may, it is typed on."""
    names = {"type": "object", "additionalProperties": {"type": "integer"},
             "propertyNames": {"pattern": "^[a-c]{1,2}$"}}
    assert run('{"bc": 1, "b', names) == (True, False)
    assert not run('{"bc": 1, "bc', names)[0] and not run('{"n5": null, "n5', {
        "type": "object", "patternProperties": {"^n[0-9]$": {"type": "null"}}})[0]
    assert run('{"b": 1, "bc": 2}', names) == (True, True)  # ("b" goes on: "ba", "bb", "bc" are free)
    props = {"type": "object", "properties": {"a": {}, "ab": {}}}
    assert run('{"a": 1, "ab": 2}', props) == (True, True) and not run('{"ab": 1, "ab', props)[0]


def test_a_dead_end_ends_the_answer(tmp_path, monkeypatch):
    """Where no token of the vocabulary continues the object (here: a pattern whose search time is spent before
    it starts, so no string character fits), the answer ends there with a stop token, cut short: finish_reason
    "length", long before max_new_tokens, the text a valid prefix; a request without stop tokens ends on the
    model's end-of-sentence."""
    import sobre.scalars
    monkeypatch.setattr(sobre.scalars, "PATTERN_SECONDS", 0.0)
    tok = train_tokenizer(['{"r": "x"}', "Hello world, 42."] * 20, vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    schema = {"type": "object", "properties": {"r": {"type": "string", "pattern": "x"}}, "required": ["r"]}
    script, steps = tok.encode('{"r": "x"}'), []

    class Writes(torch.nn.Module):  # the script's next token first, every other token alike
        def forward(self, h):
            logits = torch.zeros(*h.shape[:-1], tok.vocab_size)
            logits[..., script[min(len(steps), len(script) - 1)]] = 10.0
            steps.append(0)
            return logits

    model.head = Writes()
    eng = Engine(model, tok)
    for stops in ((tok.eos_id,), ()):  # (none: the model's end-of-sentence ends it, not a token that does not fit)
        steps.clear()
        rid = eng.add_request([5, 6], max_new_tokens=200, json_schema=schema, stop_token_ids=stops)
        while eng.has_work():
            eng.step()
        seq = eng.collect()[rid]
        text = tok.decode(seq.out[:-1])
        assert seq.finish_reason == "length" and seq.out[-1] == tok.eos_id and len(seq.out) < 200, text
        assert run(text, schema) == (True, False) and '"r"' in text, text  # (stuck in the string)


UNIQUE = {"type": "object", "properties": {
    "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "nums": {"type": "array", "items": {"type": "number"}, "uniqueItems": True},
    "sets": {"type": "array", "items": {"type": "array", "uniqueItems": True}, "uniqueItems": True},
    "objs": {"type": "array", "uniqueItems": True}, "free": {"type": "array"}}}


# keys: "id" (a property), x_* (strings), *_n (numbers), x_*_n (both: refused), anything else (closed)
PATTERNED = {"type": "object", "properties": {"id": {"type": "integer"}},
             "patternProperties": {"^x_": {"type": "string", "maxLength": 3}, "_n$": {"type": "number"}},
             "required": ["id"]}


@pytest.mark.parametrize("text,ok", [
    ('{"id": 1}', True), ('{"id": 1, "x_a": "abc", "b_n": 2.5, "x_": ""}', True),
    ('{"x_zz": "", "id": 0, "_n": -1}', True), ('{"id": 1, "x_a": "abcd"}', False), ('{"id": 1, "x_a": 3}', False),
    ('{"id": 1, "b_n": "s"}', False), ('{"id": 1, "zz": 1}', False), ('{"id": 1, "x_a_n": 1}', False),
    ('{"id": 1, "x_a": "a", "x_a": "b"}', False), ('{"x_a": "a"}', False), ('{"id": 1, "x_a_', None),
    ('{"id": 1, "q', None), ('{"id": 1, "b_n', None)])
def test_pattern_properties(text, ok):
    """patternProperties: a key a pattern finds takes that pattern's schema (the closed convention: no other key),
    a key two different schemas would rule is refused, a key being typed may still become one a pattern finds."""
    fed, done = run(text, PATTERNED)
    assert (fed and done) if ok else (fed and not done) if ok is None else not fed
    if ok:
        assert valid(parse(text), PATTERNED)
    if ok is False and not text.endswith('"x_a_n": 1}'):  # (that one is valid, but beyond SchemaPrefix)
        try:
            value = parse(text)
        except ValueError:  # (a repeated key)
            return
        assert not valid(value, PATTERNED)


def fuzz_objects(schema: dict, keys: list[str], fits: dict, values: list[str], edits: list[str], most: int,
                 beyond=lambda value: False) -> int:
    """1500 random objects of the keys (the first in 90% of them, then up to `most` - 1 others; a key's value one
    of its `fits` 80% of the time, else any of `values`), half of them edited at a random place: every text
    accepted to the end is valid for the reference, and every valid object (but those `beyond` SchemaPrefix) is
    accepted. Returns how many were accepted."""
    rng = random.Random(0)
    accepted = 0
    for _ in range(1500):
        chosen = keys[:1] * (rng.random() < 0.9) + rng.sample(keys[1:], rng.randrange(most))
        items = [(k, rng.choice(fits[k] if k in fits and rng.random() < 0.8 else values)) for k in chosen]
        rng.shuffle(items)
        text = "{" + ", ".join(f'"{k}": {v}' for k, v in items) + "}"
        pos = rng.randrange(len(text) + 1)
        if rng.random() < 0.5:
            text = text[:pos] + rng.choice(edits) + text[pos + rng.choice([0, 1]):]
        fed, done = run(text, schema)
        try:
            value = parse(text)
        except ValueError:
            assert not (fed and done), text
            continue
        if fed and done:
            accepted += 1
            assert valid(value, schema), text
        elif isinstance(value, dict) and valid(value, schema) and " " not in "".join(value) and not beyond(value):
            raise AssertionError(f"a valid object refused: {text}")
    return accepted


def test_pattern_properties_against_the_reference_validator():
    """Random objects of PATTERNED's keys (and others), random values, random edits (fuzz_objects); a key two
    patterns find (x_*_n) is valid for the reference but refused by SchemaPrefix."""
    keys = ["id", "x_", "x_ab", "b_n", "_n", "x_b_n", "zz", "xa", "a_nb"]
    fits = {"id": ["1", "-3"], "x_": ['"ab"', '""'], "x_ab": ['"abc"'], "b_n": ["1", "-2.5"], "_n": ["0"]}
    values = ['"ab"', '""', '"abcd"', "1", "-2.5", "null", "[]", "{}", "true"]
    assert fuzz_objects(PATTERNED, keys, fits, values, ['"', ",", "x_", "_n", "1", ""], 4,
                        lambda v: any(k.startswith("x_") and k.endswith("_n") for k in v)) > 100


# keys: "id" (required), "tag", any other lower-case key of up to 4 letters (an integer); 2 or 3 keys
LIMITED = {"type": "object", "properties": {"id": {"type": "integer"}, "tag": {"type": "string"}},
           "additionalProperties": {"type": "integer"}, "propertyNames": {"pattern": "^[a-z]+$", "maxLength": 4},
           "required": ["id"], "minProperties": 2, "maxProperties": 3}


@pytest.mark.parametrize("text,ok", [
    ('{"id": 1, "tag": "x"}', True), ('{"ab": 2, "cd": 3, "id": 1}', True), ('{"id": 1, "ab": 2, "cd": 3}', True),
    ('{"id": 1}', False), ('{"id": 1, "ab": 2, "cd": 3, "ef": 4}', False), ('{"ab": 2, "cd": 3, "ef"', False),
    ('{"ab": 2, "cd": 3, "i', None), ('{"id": 1, "Ab": 2}', False), ('{"id": 1, "abcde": 2}', False),
    ('{"id": 1, "ab', None), ('{"id": 1, "tag": "x", "ab": "s"}', False), ('{"id": 1, "id": 2}', False)])
def test_property_names_and_counts(text, ok):
    """propertyNames: every key follows it as it is typed; minProperties: no `}` before that many keys;
    maxProperties: no `,` past that many, and once the required keys missing would fill it, only those."""
    fed, done = run(text, LIMITED)
    assert (fed and done) if ok else (fed and not done) if ok is None else not fed
    if ok:
        assert valid(parse(text), LIMITED)
    elif ok is False and not text.endswith('"ef"'):
        try:
            assert not valid(parse(text), LIMITED)
        except ValueError:  # (a repeated key)
            pass


@pytest.mark.parametrize("text,ok", [('{"x": 1, "y.z": 2}', True), ('{"y.z": 2}', True), ('{}', True),
                                     ('{"y": 1}', False), ('{"yaz": 1}', False), ('{"y', None)])
def test_property_names_as_an_enum(text, ok):
    """propertyNames given as an enum of strings (pydantic's dict[Literal[...], ...]): those keys only, as typed."""
    schema = {"type": "object", "additionalProperties": {"type": "number"}, "propertyNames": {"enum": ["x", "y.z"]}}
    fed, done = run(text, schema)
    assert (fed and done) if ok else (fed and not done) if ok is None else not fed
    assert ok is not True or valid(parse(text), schema)


def test_property_names_and_counts_against_the_reference_validator():
    """Random objects of LIMITED's keys (and others), random values, random edits (fuzz_objects)."""
    keys = ["id", "tag", "ab", "cd", "wxyz", "Ab", "abcde", "a_b", "q"]
    fits = {"id": ["1", "-3"], "tag": ['"ab"', '""'], "ab": ["1"], "cd": ["0"], "wxyz": ["7"], "q": ["2"]}
    values = ['"ab"', '""', "1", "-3", "2.5", "null", "[]", "{}"]
    assert fuzz_objects(LIMITED, keys, fits, values, ['"', ",", "a", "}", "1", ""], 5) > 100


def test_engine_decodes_property_names_and_counts(tmp_path):
    """Sampled rows under propertyNames, minProperties and maxProperties end on objects the reference finds valid
    (or are cut short on a prefix of one)."""
    schema = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
              "propertyNames": {"pattern": "^[a-c]{1,2}$"}, "minProperties": 1, "maxProperties": 2}
    tok = train_tokenizer(['{"a": 3, "bc": 4}', "Hello world, 42."] * 20, vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    assert sampled_objects(Engine(model, tok), schema, 80)


@pytest.mark.parametrize("text,ok", [
    ('{"tags": ["a", "ab", "b"]}', True), ('{"tags": ["a", "b", "a"', False), ('{"tags": ["a", "b", "a', None),
    ('{"tags": ["a", "b", "ab"]}', True), ('{"nums": [1, 12, -1]}', True), ('{"nums": [1, 1.0]', False),
    ('{"nums": [1, 1.0', None),
    ('{"nums": [1 , 1 ', False), ('{"nums": [2.5, 25e-1,', False),
    ('{"sets": [[1, 2], [2, 1]]}', True), ('{"sets": [[1, 2], [1, 2]', False), ('{"sets": [[1, 1]', False),
    ('{"objs": [{"a": 1, "b": [2]}, {"b": [2], "a": 1}', False),
    ('{"objs": [{"a": 1}, {"a": "1"}, 1, "1", true]}', True),
    ('{"objs": [true, 1, false, true', False), ('{"free": [1, 1, "a", "a"]}', True)])
def test_unique_items(text, ok):
    """uniqueItems: an element equal to an earlier one (numbers by value, objects in any key order) is refused at
    the character that ends it; the text can still go on to a different element (a longer string or number)."""
    fed, done = run(text, UNIQUE)
    if ok:
        assert fed and done and valid(parse(text), UNIQUE), text
    else:
        assert (fed and not done if ok is None else not fed), text
    # numbers by exact value, not as floats (where the reference, reading floats, cannot tell them apart)
    assert run('{"nums": [1, 1.00000000000000001]}', UNIQUE) == (True, True)


def test_the_vocabulary_check_equals_checking_every_token(tmp_path):
    """Engine._fitting (first characters checked once, then the tokens that start with an accepted one) against
    its reference, _fits on every token, at prefixes of a schema and of JSON mode."""
    tok = train_tokenizer(['{"name": "x", "n": 12, "tags": ["a"], "ok": true}', "Hello world, 42."] * 20,
                          vocab_size=300, out=tmp_path)
    model = random_model(sobre.preset("debug", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    eng = Engine(model, tok)
    for kw in ({"json_schema": SCHEMA}, {"json": True}):
        eng.add_request([5, 6], max_new_tokens=4, stop_token_ids=(tok.eos_id,), **kw)
        seq = eng.waiting[-1]
        for piece in ["", "{", ' "na', 'me": "x', '", "n": 1', "2", ', "tags": [', '"a"', "]", "}"]:
            assert seq.json.feed(piece)
            assert eng._fitting(seq) == [eng._fits(seq, t) for t in range(len(eng.texts))], piece
