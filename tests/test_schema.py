"""Structured outputs (response_format json_schema): SchemaPrefix against a reference validator on valid, mutated
and random texts; unsupported keywords refused; the engine's constrained decoding ends on a valid object."""

import json
import random

import pytest
import torch

import sobre
from sobre.engine import Engine
from sobre.sampling import SamplingParams
from sobre.schema import SchemaPrefix, check_schema
from sobre.tokenizer import train_tokenizer

from conftest import random_model

PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "number"}},
       "required": ["kind"]}
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": ["boolean", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", 'b"c', "é"]}},
    "pets": {"type": "array", "items": PET}, "any": {}, "extra": {"type": "object", "additionalProperties": True}},
    "required": ["name", "n"], "additionalProperties": False}


def valid(value, schema) -> bool:
    """The reference: does a parsed value satisfy the schema (the keywords check_schema allows)?"""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    if types is not None:
        def fits(t):
            if t in ("number", "integer"):
                return isinstance(value, int | float) and not isinstance(value, bool) and (
                    t == "number" or isinstance(value, int))
            return isinstance(value, kinds[t])
        if not any(fits(t) for t in types):
            return False
    if "enum" in schema and value not in schema["enum"] or "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if not set(schema.get("required", ())) <= set(value):
            return False
        closed = "properties" in schema and not schema.get("additionalProperties", False)
        if closed and not set(value) <= set(props):
            return False
        return all(valid(v, props.get(k, {})) for k, v in value.items())
    if isinstance(value, list):
        return all(valid(v, schema.get("items", {})) for v in value)
    return True


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


def sample_value(rng, schema, depth=0):
    """A random value that satisfies the schema."""
    if "enum" in schema:
        return rng.choice(schema["enum"])
    types = schema.get("type", rng.choice(["string", "integer", "array", "object", "null"] if depth < 2 else ["null"]))
    t = rng.choice(types) if isinstance(types, list) else types
    if t == "object":
        props = schema.get("properties", {})
        keys = [k for k in props if k in schema.get("required", ()) or rng.random() < 0.5]
        out = {k: sample_value(rng, props[k], depth + 1) for k in keys}
        if "properties" not in schema or schema.get("additionalProperties"):
            out.update({f"k{i}": sample_value(rng, {}, depth + 1) for i in range(rng.randrange(3))})
        return dict(rng.sample(list(out.items()), len(out)))
    if t == "array":
        return [sample_value(rng, schema.get("items", {}), depth + 1) for _ in range(rng.randrange(3))]
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


def test_schema_prefix_against_the_reference_validator():
    """Random valid objects, written with random whitespace, are accepted to the end; random edits of them are
    accepted and complete only when the reference parses and validates them (2000 texts)."""
    rng = random.Random(0)
    edits = list('{}[]",:0123456789.-e tfnul"xaébk') + ['"name"', '"n"', '"zz"', '"dog"']
    for _ in range(1000):
        value = sample_value(rng, SCHEMA)
        text = json.dumps(value, ensure_ascii=False, separators=rng.choice([(",", ":"), (", ", ": "), (" ,", " : ")]))
        assert valid(value, SCHEMA) and run(text) == (True, True), text
        pos = rng.randrange(len(text) + 1)
        cut = pos + rng.choice([0, 1, 1, 2])
        mutated = text[:pos] + rng.choice(edits + [""]) + text[cut:]
        fed, done = run(mutated)
        if fed and done:
            assert valid(parse(mutated), SCHEMA), mutated


@pytest.mark.parametrize("schema,says", [
    ({"type": "array"}, "top level must be"), ({"type": "object", "properties": {"a": {"pattern": "x"}}}, "'pattern'"),
    ({"type": "object", "anyOf": []}, "'anyOf'"), ({"type": "object", "properties": {"a": {"$ref": "#"}}}, "'\\$ref'"),
    ({"type": "object", "properties": {"a": {"enum": [1, 2]}}}, "strings only"),
    ({"type": "object", "properties": {"a": {"type": "null", "enum": ["x"]}}}, "allows strings"),
    ({"type": "object", "required": ["b"]}, "required must list"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "only true or false"),
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
    eng = Engine(model, tok)
    rids = [eng.add_request([5, 6 + i], max_new_tokens=40, json_schema=schema, temperature=1.0, seed=i)
            for i in range(4)]
    done = {}
    while eng.has_work():
        eng.step()
        done.update(eng.collect())
    for r in rids:
        text = tok.decode(done[r].out)
        fed, complete = run(text, schema)
        assert fed and (done[r].finish_reason == "length" or complete and valid(parse(text), schema)), text
