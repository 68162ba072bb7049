"""Structured outputs (OpenAI's response_format {"type": "json_schema"}): a completion constrained to one JSON object
that satisfies a schema, the same way JSON mode is constrained (constrain.JsonPrefix: the engine rejects a token
whose text would leave the language and draws again without it).

`SchemaPrefix` follows JsonPrefix's syntax and checks the schema as the text arrives: an object's keys are among its
`properties` (each once; any key where `additionalProperties` is true or a schema, or where neither it nor properties
are given: an object with properties is closed unless it says otherwise, as OpenAI's strict mode), or keys a
`patternProperties` regex finds (such an object is closed alike; a key that would have to satisfy two different schemas,
a property's and a pattern's or two patterns', is refused), a key being typed is a prefix of one still allowed (one
written already only as the start of a longer one); every key follows `propertyNames` (a string schema: pattern, format,
length, or an enum / const of strings) as it is typed; `}` only once every `required` key is there and `minProperties`
keys, a `,` only below `maxProperties` (and once the required keys missing would fill it, only those may be written),
each value's first character fits its `type` (a list of types too), an `integer` has no fraction or exponent, `enum` /
`const` values (any JSON) are typed as their compact JSON text, an array's elements follow `items`, between `minItems`
and `maxItems` of them, `uniqueItems` (an element equal to an earlier one refused where it ends). `anyOf` (and a
one-entry `allOf`) forks the reading: each alternative is followed until the text leaves it (readings that agree again
are merged); `oneOf` too where it is a discriminated union (no value satisfies two alternatives); `$ref` points inside
the schema (`#`, `#/$defs/...`), recursion included. A string's `pattern`, `format`, `minLength` / `maxLength` and a
number's bounds and `multipleOf` are checked on its text so far (sobre.scalars). A `,` or key in an object with no key
left to write is refused (it would be a dead end); a string whose pattern and maxLength leave no common completion can
still dead-end (the engine then ends the answer there, finish_reason "length"). That is what pydantic models and
OpenAI's strict mode use, and more; any other keyword (if / then, dependentRequired, ...), or a oneOf whose alternatives
may overlap, is refused by `check_schema`, never ignored.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from urllib.parse import unquote

import regex

from .constrain import DIGITS, ESCAPED, NUMBER_END, JsonPrefix, _number
from .scalars import NUMBER_KEYS, STRING_KEYS, Bounds, Text

TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
DOC = {"title", "description", "$schema", "default", "examples", "$comment"}  # (documentation only)
DEFS = {"$defs", "definitions"}
KEY_CHARS = [chr(i) for i in range(32, 127) if chr(i) not in '"\\']  # what a key written already may go on with
CHOICE = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")  # keywords that pick among values, one per schema
BESIDE = {"enum": {"type"}, "const": {"type"}, "anyOf": {"discriminator"}, "oneOf": {"discriminator"}}  # (and DOC)
KEYWORDS = {"type", "properties", "required", "additionalProperties", "patternProperties", "propertyNames",
            "minProperties", "maxProperties", "items", "minItems", "maxItems", "uniqueItems", "discriminator", *CHOICE,
            *DOC, *DEFS, *STRING_KEYS, *NUMBER_KEYS}
NAME_KEYS = {"type", "enum", "const", *STRING_KEYS, *DOC}  # what a propertyNames schema may say (of a string)
FIRST = {"{": "object", "[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}


def check_schema(schema) -> None:
    """ValueError naming the first part of the schema SchemaPrefix cannot enforce (the top level must be an
    object)."""
    Schema(schema)


def _open(schema: dict) -> bool:
    """Does an object take keys beyond its properties / patternProperties? (additionalProperties true or a schema;
    unsaid: only where it has neither, the closed convention of OpenAI's strict mode)"""
    return schema.get("additionalProperties", not {"properties", "patternProperties"} & set(schema)) is not False


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    return set(t) if isinstance(t, list) else {t} if isinstance(t, str) else set()


def _canon(text: str):
    """A JSON value's identity for uniqueItems: numbers by exact value (1 and 1.0 are equal), objects by their
    keys and values in any order."""
    def canon(v):
        if isinstance(v, dict):
            return "o", frozenset((k, canon(x)) for k, x in v.items())
        if isinstance(v, list):
            return "a", tuple(canon(x) for x in v)
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return type(v).__name__, v
        return "n", Fraction(v)
    return canon(json.loads(text, parse_float=Fraction))


def _fits(value, types: set[str]) -> bool:
    """Is a JSON value of one of the types (any when none)?"""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    kinds = {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
             "boolean": isinstance(value, bool), "null": value is None, "number": number,
             "integer": number and float(value).is_integer()}
    return not types or any(kinds[t] for t in types)


class Schema:
    """A schema checked once, with each part's alternatives: the object / array / scalar schemas a value may
    follow, and one tuple of the JSON texts its enum / const allows (cached, shared by every reading)."""

    def __init__(self, root):
        if not isinstance(root, dict):
            raise ValueError("schema must be a JSON object")
        self.root = root
        self.alts: dict[int, list] = {}
        self.rules: dict[int, tuple[Text | None, Bounds | None]] = {}  # a part's string and number rules
        self.patterns: dict[int, list[tuple[Text, dict]]] = {}  # an object's patternProperties: (key rule, schema)
        self.names: dict[int, Text] = {}  # an object's propertyNames, the rule every key follows
        self.keys: dict[int, list[str]] = {}  # an object's properties that propertyNames allows (where it has one)
        self.checked: set[int] = set()
        self._check(root, "schema")
        if any(not isinstance(a, dict) or _types(a) != {"object"} for a in self.expand(root)):
            raise ValueError("schema: the top level must be {\"type\": \"object\", ...}")

    def _check(self, s, where: str) -> None:
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be a JSON object")
        if id(s) in self.checked:  # (reached again through a $ref)
            return
        self.checked.add(id(s))
        extra = sorted(set(s) - KEYWORDS)
        if extra:
            raise ValueError(f"{where}: keyword {extra[0]!r} is not supported "
                             f"(supported: {', '.join(sorted(KEYWORDS))})")
        for defs in DEFS & set(s):
            if not isinstance(s[defs], dict):
                raise ValueError(f"{where}.{defs} must be an object")
            for name, sub in s[defs].items():
                self._check(sub, f"{where}.{defs}.{name}")
        if "type" in s and (not _types(s) or _types(s) - TYPES):
            raise ValueError(f"{where}.type: expected one or more of {sorted(TYPES)}")
        choice = [k for k in CHOICE if k in s]
        if choice:
            beside = set(s) - DOC - DEFS - {choice[0]} - BESIDE.get(choice[0], set())
            if beside:
                raise ValueError(f"{where}: {sorted(beside)[0]!r} beside {choice[0]!r} is not supported")
            self._check_choice(s, choice[0], where)
            self.expand(s)  # (a $ref / anyOf cycle that never reaches a value is refused here)
            return
        props = s.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError(f"{where}.properties must be an object")
        for key, sub in props.items():
            if '"' in key or "\\" in key or any(c < " " for c in key):
                raise ValueError(f"{where}.properties: key {key!r} has a quote, backslash or control character")
            self._check(sub, f"{where}.properties.{key}")
        required = s.get("required", [])
        if not isinstance(required, list) or any(k not in props for k in required):
            raise ValueError(f"{where}.required must list keys of properties")
        extra = s.get("additionalProperties", False)
        if not isinstance(extra, bool):
            self._check(extra, f"{where}.additionalProperties")
        patterns = s.get("patternProperties", {})
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}.patternProperties must be an object")
        for pattern, sub in patterns.items():
            self._check(sub, f"{where}.patternProperties.{pattern}")
        if patterns:
            self.patterns[id(s)] = [(Text({"pattern": p}, f"{where}.patternProperties"), sub)
                                    for p, sub in patterns.items()]
        if "propertyNames" in s:  # (the properties it allows found once, not at every character of a key)
            names = self.names[id(s)] = self._names(s["propertyNames"], f"{where}.propertyNames")
            self.keys[id(s)] = [k for k in props if names.allows(k)]
            bad = [k for k in required if k not in self.keys[id(s)]]
            if bad:
                raise ValueError(f"{where}.required: key {bad[0]!r} does not satisfy propertyNames")
        lo, hi = s.get("minProperties", 0), s.get("maxProperties", math.inf)
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (lo, hi) if n != math.inf) or lo > hi:
            raise ValueError(f"{where}: minProperties / maxProperties must be integers >= 0, minProperties <= "
                             "maxProperties")
        if len(required) > hi:
            raise ValueError(f"{where}: maxProperties {hi} is below the {len(required)} required keys")
        keys = self.keys.get(id(s), props)
        if not _open(s) and not patterns and lo > len(keys):
            raise ValueError(f"{where}: minProperties {lo}, but the object may hold only {len(keys)} keys")
        if "items" in s:
            self._check(s["items"], f"{where}.items")
        lo, hi = s.get("minItems", 0), s.get("maxItems", math.inf)
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (lo, hi) if n != math.inf) or lo > hi:
            raise ValueError(f"{where}: minItems / maxItems must be integers >= 0, minItems <= maxItems")
        if not isinstance(s.get("uniqueItems", False), bool):
            raise ValueError(f"{where}.uniqueItems must be true or false")
        integer = "integer" in _types(s) and "number" not in _types(s)
        self.rules[id(s)] = (Text(s, where) if set(STRING_KEYS) & set(s) else None,
                             Bounds(s, integer, where) if set(NUMBER_KEYS) & set(s) else None)

    def _names(self, s, where: str) -> Text:
        """A propertyNames schema as the rule of a key's text: a string's pattern / format / length, or an enum /
        const of strings (as an anchored alternation)."""
        if not isinstance(s, dict):
            raise ValueError(f"{where} must be a JSON object")
        if set(s) - NAME_KEYS or s.get("type", "string") != "string":
            raise ValueError(f"{where}: supported as a string schema ({', '.join(sorted(NAME_KEYS - DOC))})")
        values = s["enum"] if "enum" in s else [s["const"]] if "const" in s else None
        if values is None:
            return Text(s, where)
        if set(STRING_KEYS) & set(s) or not isinstance(values, list) or not values or \
                not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}: an enum / const of strings, alone")
        return Text({"pattern": "^(?:" + "|".join(regex.escape(v) for v in values) + ")$"}, where)

    def _check_choice(self, s: dict, key: str, where: str) -> None:
        if key == "$ref":
            self._check(self.resolve(s["$ref"], where), f"{where}.$ref {s['$ref']}")
        elif key in ("anyOf", "oneOf", "allOf"):
            subs = s[key]
            if not isinstance(subs, list) or not subs or key == "allOf" and len(subs) != 1:
                raise ValueError(f"{where}.{key} must be a non-empty list" + (" of one schema" * (key == "allOf")))
            for i, sub in enumerate(subs):
                self._check(sub, f"{where}.{key}[{i}]")
            if key == "oneOf":
                self._exclusive(s, where)
        else:
            values = s["enum"] if key == "enum" else [s["const"]]
            if not isinstance(values, list) or not values:
                raise ValueError(f"{where}.enum must be a non-empty list")
            try:
                [json.dumps(v, allow_nan=False) for v in values]
            except ValueError:
                raise ValueError(f"{where}.{key}: NaN and infinities are not JSON") from None
            if not any(_fits(v, _types(s)) for v in values):
                raise ValueError(f"{where}: no {key} value has the schema's type (it could never be written)")

    def _exclusive(self, s: dict, where: str) -> None:
        """oneOf reads as anyOf where no value satisfies two alternatives: a discriminated union (pydantic's), each
        alternative an object that requires one property (the discriminator's, else one they all require) with
        string const / enum values no other alternative has."""
        alts = [a for sub in s["oneOf"] for a in self.expand(sub)]
        disc = s.get("discriminator")
        names = [disc.get("propertyName")] if isinstance(disc, dict) else \
            set.intersection(*(set(a.get("required", ())) if isinstance(a, dict) else set() for a in alts))
        for name in names:
            seen: set[str] = set()
            for a in alts:
                vals = self.expand(a["properties"][name]) if isinstance(a, dict) and name in a.get("required", ()) \
                    else None
                if not vals or len(vals) != 1 or not isinstance(vals[0], tuple) or seen & set(vals[0]) or \
                        not all(t.startswith('"') for t in vals[0]):
                    break
                seen |= set(vals[0])
            else:
                return
        raise ValueError(f"{where}.oneOf: supported as a discriminated union only (each alternative an object that "
                         "requires one property with string const / enum values no other has); anyOf otherwise")

    def resolve(self, ref, where: str) -> dict:
        """The part of the schema a local $ref ("#", "#/$defs/Name", any JSON pointer into it) names."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise ValueError(f"{where}.$ref: only references inside the schema ('#/$defs/...') are supported")
        node = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise ValueError(f"{where}.$ref: {ref!r} names nothing in the schema")
        if not isinstance(node, dict):
            raise ValueError(f"{where}.$ref: {ref!r} is not a schema")
        return node

    def expand(self, s: dict, path: frozenset = frozenset()) -> list:
        """s's alternatives: schemas without $ref / anyOf / allOf / enum / const, and at most one tuple of
        JSON texts (its enum / const values, each in compact form)."""
        if id(s) in self.alts:
            return self.alts[id(s)]
        if not isinstance(s, dict):
            raise ValueError("schema: every part of a schema must be a JSON object")
        if id(s) in path:
            raise ValueError("schema: a $ref / anyOf / allOf cycle that never reaches a value")
        path = path | {id(s)}
        if "$ref" in s:
            out = self.expand(self.resolve(s["$ref"], "schema"), path)
        elif "anyOf" in s or "oneOf" in s or "allOf" in s:  # (oneOf: only where no value fits two, _exclusive)
            out, texts = [], []
            for sub in s.get("anyOf") or s.get("oneOf") or s["allOf"]:
                for a in self.expand(sub, path):
                    texts += a if isinstance(a, tuple) else []
                    out += [] if isinstance(a, tuple) or any(a is b for b in out) else [a]
            out += [tuple(dict.fromkeys(texts))] if texts else []
        elif "enum" in s or "const" in s:
            values = s["enum"] if "enum" in s else [s["const"]]
            out = [tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                                       for v in values if _fits(v, _types(s))))]
        else:
            out = [s]
        self.alts[id(s)] = out
        return out


class SchemaPrefix:
    """Whether text is still the start of an object the schema allows: the set of its readings (one, unless
    anyOf leaves more than one alternative open). The interface of JsonPrefix (accepts, feed, complete)."""

    def __init__(self, schema: dict):
        self.readings = [_Reading(Schema(schema))]

    @property
    def complete(self) -> bool:
        return any(r.complete for r in self.readings)

    def accepts(self, text: str) -> bool:
        return bool(_advance([r._trial() for r in self.readings], text))

    def feed(self, text: str) -> bool:
        """Advance over text; False (and no reading left) at the first character no allowed object goes on with."""
        self.readings = _advance(self.readings, text)
        return bool(self.readings)


def _advance(readings: list[_Reading], text: str) -> list[_Reading]:
    """The readings that go on through text (readings are changed in place; forks are copies)."""
    for ch in text:
        live = [f for r in readings for f in r.forks() if f.step(ch)]
        readings = list({f.signature(): f for f in live}.values()) if len(live) > 1 else live
        if not readings:
            break
    return readings


class _Reading(JsonPrefix):
    """One reading of the text: JsonPrefix's syntax plus the schema of every open container."""

    def __init__(self, schema: Schema):
        super().__init__()
        self.schema = schema
        self.pending: dict | tuple | None = schema.root  # what the value that starts next follows
        self.ctx: list[tuple[dict, frozenset, int]] = []  # per open container: its schema, keys so far, items so far
        self.keybuf = ""  # the object key being typed
        self.integer = False  # the number being read must stay an integer
        self.rule: Text | Bounds | None = None  # the string or number being read follows these rules
        self.text = ""  # ... on its text so far (a string's decoded)
        self.hex = ""  # the digits of a \u escape in it
        self.unique: tuple = ()  # per open array with uniqueItems: (depth, element text, checked, elements seen)

    def _trial(self) -> _Reading:
        trial = super()._trial()
        trial.ctx = list(self.ctx)  # (the rest is immutable)
        return trial

    def signature(self) -> tuple:
        """Readings with equal signatures read every future text alike."""
        p = self.pending
        return (self.state, self.sub, self.key, tuple(self.stack), self.keybuf, self.integer, id(self.rule), self.text,
                self.hex, self.unique, tuple((id(s), used, n) for s, used, n in self.ctx),
                id(p) if isinstance(p, dict) else p)

    def forks(self) -> list[_Reading]:
        """Before a value: one reading per alternative of its schema (self when there is one)."""
        if self.state not in ("start", "value") or not isinstance(self.pending, dict):
            return [self]
        alts = self.schema.expand(self.pending)
        if len(alts) == 1:
            self.pending = alts[0]
            return [self]
        out = [self._trial() for _ in alts]
        for r, a in zip(out, alts):
            r.pending = a
        return out

    def step(self, ch: str) -> bool:
        """Read one character (False: no allowed object goes on with it)."""
        depth = len(self.stack)
        return self._char(ch) and (not (self.unique or ch == "[") or self._unique(ch, depth))

    def _unique(self, ch: str, before: int) -> bool:
        """uniqueItems: each such open array keeps its current element's text; an element equal to an earlier
        one is refused at the character that ends it (a string's closing quote, a number's next character, ...)."""
        out, depth = [], len(self.stack)
        for d, text, checked, seen in self.unique:
            if depth < d or depth == d and ch == "," and self.state == "value":  # the array closed, or a next item
                if not checked and text.strip() and _canon(text) in seen:
                    return False
                if depth == d:
                    out.append((d, "", False, seen if checked else seen | {_canon(text)}))
                continue
            text += ch
            if depth == d and self.state == "after" and not checked and text.strip():  # the element just ended
                key = _canon(text)
                if key in seen:
                    return False
                checked, seen = True, seen | {key}
            out.append((d, text, checked, seen))
        if ch == "[" and depth == before + 1 and self.ctx[-1][0].get("uniqueItems"):
            out.append((depth, "", False, frozenset()))
        self.unique = tuple(out)
        return True

    def _char(self, ch: str) -> bool:
        s = self.state
        if s == "enum":  # self.sub: the rest of each allowed text
            rest = tuple(t[1:] for t in self.sub if t[:1] == ch)
            if rest:
                self.state, self.sub = ("after", None) if rest == ("",) else ("enum", rest)
                return True
            if "" not in self.sub:
                return False
            self.state, self.sub = "after", None  # (a number that ended: ch goes on from there)
            return self._char(ch)
        if s == "number" and self.integer and ch in ".eE":
            return False
        if self.rule is not None and s in ("string", "escape", "unicode", "number"):
            return self._ruled(ch)
        if s == "string" and self.key:  # (no escapes in keys: a key's state stays "string")
            if ch == '"':
                return self._key_done() and super()._char(ch)
            self.keybuf += ch
            return ch != "\\" and self._may_start(self.keybuf) and super()._char(ch)
        if s in ("key_or_end", "key") and ch == '"':
            if not self._more_keys():
                return False
            self.keybuf = ""
        if s == "after" and ch == ",":
            schema, _, n = self.ctx[-1]
            if self.stack[-1] == "[":
                if n >= schema.get("maxItems", math.inf):
                    return False
                self.pending = schema.get("items", {})
            elif not self._more_keys():  # (no key may follow: a dead end)
                return False
        return super()._char(ch)

    def _may_start(self, key: str) -> bool:
        """Can a key that starts with `key` still be written in the open object? (its propertyNames allow it; once
        the required keys missing would fill maxProperties, only those; not one written already)"""
        schema, used, _ = self.ctx[-1]
        names = self.schema.names.get(id(schema))
        if names is not None and not names.viable(key):
            return False
        reserved = self._reserved()
        if reserved is not None:
            ok = any(k.startswith(key) for k in reserved)
        else:
            ok = self._free_keys() or any(k.startswith(key) for k in self._keys_left()) or \
                any(t.viable(key) for t, _ in self._patterns())
        # a key written already, typed again: only as the start of a longer key (one printable ASCII character
        # further), else the object would dead-end at its closing quote
        return ok and (key not in used or any(self._may_start(key + c) for c in KEY_CHARS))

    def _reserved(self) -> set[str] | None:
        """The required keys the open object still misses, where they alone may still be written (they would fill
        its maxProperties); else None."""
        schema, used, _ = self.ctx[-1]
        missing = set(schema.get("required", ())) - used
        return missing if len(used) + len(missing) >= schema.get("maxProperties", math.inf) else None

    def _keys_left(self) -> list[str]:
        schema, used, _ = self.ctx[-1]
        return [k for k in self.schema.keys.get(id(schema), schema.get("properties", {})) if k not in used]

    def _patterns(self) -> list[tuple[Text, dict]]:
        return self.schema.patterns.get(id(self.ctx[-1][0]), [])

    def _more_keys(self) -> bool:
        """Whether another key may be written in the open object."""
        schema, used, _ = self.ctx[-1]
        return len(used) < schema.get("maxProperties", math.inf) and (
            self._free_keys() or bool(self._keys_left()) or bool(self._patterns()))

    def _free_keys(self) -> bool:
        """Whether the open object takes keys beyond its properties."""
        return _open(self.ctx[-1][0])

    def _key_done(self) -> bool:
        """The key ends: its value follows its property's schema and those of the patternProperties it matches,
        else additionalProperties' (where allowed). A key that would hold a value to two different schemas at once
        is not written (an allOf of them is beyond SchemaPrefix): refused, as an unknown key."""
        schema, used, n = self.ctx[-1]
        key, props = self.keybuf, schema.get("properties", {})
        names, reserved = self.schema.names.get(id(schema)), self._reserved()
        if key in used or names is not None and not names.done(key) or reserved is not None and key not in reserved:
            return False
        subs = ([props[key]] if key in props else []) + [sub for t, sub in self._patterns() if t.done(key)]
        if not subs:
            if not self._free_keys():
                return False
            extra = schema.get("additionalProperties", {})
            subs = [extra if isinstance(extra, dict) else {}]
        rules = list({id(sub): sub for sub in subs if sub}.values())  # ({} allows any value)
        if len(rules) > 1:
            return False
        self.ctx[-1] = (schema, used | {key}, n)
        self.pending = rules[0] if rules else {}
        return True

    def _value(self, ch: str) -> bool:
        p = self.pending
        if self.stack[-1] == "[":
            schema, used, n = self.ctx[-1]
            if ch == "]" and self.sub == "first":  # an empty array
                self.pending = None
                return schema.get("minItems", 0) == 0 and super()._value(ch)
            self.ctx[-1] = (schema, used, n + 1)
        if isinstance(p, tuple):  # enum / const: one of these texts
            self.state, self.sub, self.pending = "enum", p, None
            return self._char(ch)
        kind = FIRST.get(ch, "number" if ch == "-" or ch in DIGITS else None)
        types = _types(p)
        if types and not (kind in types or kind == "number" and "integer" in types):
            return False
        self.integer = kind == "number" and "number" not in types and "integer" in types
        text, bounds = self.schema.rules.get(id(p), (None, None))
        self.rule, self.text = (text, "") if kind == "string" else (bounds, ch) if kind == "number" else (None, "")
        if self.rule is bounds is not None and not bounds.viable(ch):
            return False
        if kind not in ("object", "array"):
            self.pending = None  # (_open reads it: the container's schema)
        return super()._value(ch)

    def _ruled(self, ch: str) -> bool:
        """A character of a string or number that has rules (scalars.Text / Bounds)."""
        s, rule = self.state, self.rule
        if s == "number":
            if _number(self.sub, ch) is None:  # the number ends here: its value must be within bounds
                if not NUMBER_END[self.sub] or not rule.done(self.text):
                    return False
                self.rule = None
                return self._char(ch)
            self.text += ch
            return ch not in "eE" and rule.viable(self.text) and super()._char(ch)
        if s == "string" and ch == '"':
            if not rule.done(self.text):
                return False
            self.rule = None
            return super()._char(ch)
        if not super()._char(ch):
            return False
        if s == "string":
            return ch == "\\" or self._add(ch)
        if s == "escape":
            self.hex = ""
            return ch == "u" or self._add(ESCAPED[ch])
        self.hex += ch
        if len(self.hex) < 4:
            return True
        code = int(self.hex, 16)
        if 0xDC00 <= code < 0xE000 and self.text and 0xD800 <= ord(self.text[-1]) < 0xDC00:  # a surrogate pair
            code = 0x10000 + (ord(self.text[-1]) - 0xD800) * 0x400 + code - 0xDC00
            self.text = self.text[:-1]
        return self._add(chr(code))

    def _add(self, c: str) -> bool:
        self.text += c
        return self.rule.viable(self.text)

    def _open(self, ch: str) -> bool:
        self.ctx.append((self.pending, frozenset(), 0))
        self.pending = self.pending.get("items", {}) if ch == "[" else None
        return super()._open(ch)

    def _close(self, ch: str) -> bool:
        if not self.ctx:
            return False
        schema, used, n = self.ctx[-1]
        if ch == "}" and (not set(schema.get("required", ())) <= used or len(used) < schema.get("minProperties", 0)) \
                or ch == "]" and n < schema.get("minItems", 0):
            return False
        self.ctx.pop()
        return super()._close(ch)
