"""Structured outputs, one value at a time: the JSON-schema keywords on a string or a number, checked on the text
typed so far (sobre.schema calls them on every character), so that a completion never writes a value it could
not finish.

`Text`: `pattern` (searched, as JSON Schema's: unanchored unless the pattern anchors it; `regex`'s partial
matching says whether the text can still become a match), `format` (date, time, date-time as RFC 3339, with
real calendar days; duration, email, hostname, uuid, ipv4, ipv6: OpenAI's list), `minLength` / `maxLength` (code
points). `Bounds`: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`: a number's digits
are refused once no number they start lies within them (and is a multiple: exact rational arithmetic, so 0.1 and
0.3 behave as written); numbers under these keywords are written without an exponent.
"""

from __future__ import annotations

import math
import time
from datetime import date
from fractions import Fraction

import regex

STRING_KEYS = ("pattern", "format", "minLength", "maxLength")
NUMBER_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"


def _ipv6() -> str:
    """RFC 4291's text forms: eight groups of 1-4 hex digits, or fewer around one "::" (one or more zero groups),
    the last two groups written as an IPv4 address or not. One alternative per count of groups before the "::"."""
    h = "[0-9A-Fa-f]{1,4}"
    forms = [f"({h}:){{7}}{h}", f"({h}:){{6}}{_IPV4}"]
    for i in range(8):  # i groups, "::", at most 7 - i groups
        left = f"({h}:){{{i - 1}}}{h}" if i else ""
        forms.append(left + "::" + (f"(({h}:){{0,{6 - i}}}{h})?" if i < 7 else ""))
    for i in range(6):  # ... ending in an IPv4 address (two groups): at most 5 - i groups before it
        forms.append((f"({h}:){{{i - 1}}}{h}" if i else "") + f"::({h}:){{0,{5 - i}}}{_IPV4}")
    return "(" + "|".join(forms) + ")"


# a hostname's label: 1-63 letters, digits, hyphens, not at either end, nor "--" in 3rd-4th place (RFC 5891 keeps
# that for IDNA A-labels, "xn--" + punycode, which validators decode: not written here)
_HOST_LABEL = r"(?![A-Za-z0-9-]{2}--)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DIGITS = r"\d+"
_DURATION_DATE = rf"({_DIGITS}D|{_DIGITS}M({_DIGITS}D)?|{_DIGITS}Y({_DIGITS}M({_DIGITS}D)?)?)"
_DURATION_TIME = rf"T({_DIGITS}H({_DIGITS}M({_DIGITS}S)?)?|{_DIGITS}M({_DIGITS}S)?|{_DIGITS}S)"
# formats (OpenAI's structured outputs list): each a regex its whole text matches; hostname also <= 253 characters
FORMATS = {"date": _DATE, "time": _TIME, "date-time": _DATE + "[Tt]" + _TIME,
           "duration": rf"P({_DURATION_DATE}({_DURATION_TIME})?|{_DURATION_TIME}|{_DIGITS}W)",  # (RFC 3339, app. A)
           "email": rf"[A-Za-z0-9_%+-]+(\.[A-Za-z0-9_%+-]+)*@{_LABEL}(\.{_LABEL})+",
           "hostname": rf"{_HOST_LABEL}(\.{_HOST_LABEL})*",
           "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
           "ipv4": _IPV4, "ipv6": _ipv6()}
PATTERN_SECONDS = 1.0  # a request's pattern searches stop there (a pattern that backtracks exponentially)


def _count(s: dict, key: str, where: str):
    n = s.get(key)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"{where}.{key} must be an integer >= 0")
    return n


class Text:
    """A string's pattern / format / length, on its decoded characters so far."""

    def __init__(self, s: dict, where: str):
        try:
            self.pattern = regex.compile(s["pattern"], regex.ASCII) if "pattern" in s else None
        except (regex.error, TypeError) as e:
            raise ValueError(f"{where}.pattern: not a regular expression ({e})") from None
        fmt = s.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"{where}.format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
        self.format = regex.compile(FORMATS[fmt], regex.ASCII) if fmt else None
        self.dated = fmt in ("date", "date-time")
        self.budget = PATTERN_SECONDS  # (one Text per request: sobre.schema builds a Schema per constrained request)
        self.lo, self.hi = _count(s, "minLength", where) or 0, _count(s, "maxLength", where)
        if fmt == "hostname":  # (RFC 1123)
            self.hi = min(self.hi if self.hi is not None else 253, 253)
        if self.hi is not None and self.lo > self.hi:
            raise ValueError(f"{where}: minLength > maxLength (no string has both)")

    def viable(self, text: str) -> bool:
        """Can a string that starts with text still satisfy every rule?"""
        return (self.hi is None or len(text) <= self.hi) and \
            (self.pattern is None or self._search(text, partial=True)) and \
            (self.format is None or self.format.fullmatch(text, partial=True) is not None) and \
            (not self.dated or len(text) < 10 or _real_day(text[:10]))

    def allows(self, text: str) -> bool:
        """Does a whole string, not read character by character, satisfy every rule?"""
        return self.viable(text) and self.done(text)

    def done(self, text: str) -> bool:
        """Does the string text satisfy every rule? (viable held for each of its prefixes and itself: sobre.schema
        checks it as every character arrives)"""
        return len(text) >= self.lo and \
            (self.pattern is None or self._search(text, partial=False)) and \
            (self.format is None or self.format.fullmatch(text) is not None)

    def _search(self, text: str, partial: bool) -> bool:
        """pattern.search, within the time left to the request; once that is spent, every text is refused (the
        string cannot go on: a bounded stall instead of a server hung on one pattern)."""
        if self.budget <= 0:
            return False
        start = time.perf_counter()
        try:
            found = self.pattern.search(text, partial=partial, timeout=self.budget) is not None
        except TimeoutError:  # (spent, whatever our clock says: regex's timer may fire a hair before it)
            self.budget = 0
            return False
        self.budget -= time.perf_counter() - start
        return found


def _real_day(text: str) -> bool:
    try:
        date.fromisoformat(text)
        return True
    except ValueError:
        return False


class Bounds:
    """A number's bounds and step. Each bound is (value, exclusive); a number's text is checked by the values the
    numbers it starts can take: a span of magnitudes per count of digits still to come, which must hold a
    multiple of the step (multipleOf; for an integer, of its numerator: the integers among the multiples of p/q
    are the multiples of p)."""

    def __init__(self, s: dict, integer: bool, where: str):
        for k in NUMBER_KEYS:
            v = s.get(k)
            if k in s and (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)):
                raise ValueError(f"{where}.{k} must be a finite number")
        lows = [(Fraction(str(s[k])), k.startswith("exclusive")) for k in ("minimum", "exclusiveMinimum") if k in s]
        highs = [(Fraction(str(s[k])), k.startswith("exclusive")) for k in ("maximum", "exclusiveMaximum") if k in s]
        self.lo = max(lows, default=(-math.inf, False))  # (the tighter: at equal values the exclusive one)
        self.hi = min(highs, default=(math.inf, False), key=_upper)
        if integer:  # the integers within: closed bounds
            lo, hi = self.lo, self.hi
            self.lo = (math.floor(lo[0]) + 1 if lo[1] or lo[0] != math.floor(lo[0]) else lo[0], False) \
                if lo[0] != -math.inf else lo
            self.hi = (math.ceil(hi[0]) - 1 if hi[1] or hi[0] != math.ceil(hi[0]) else hi[0], False) \
                if hi[0] != math.inf else hi
        step = Fraction(str(s["multipleOf"])) if "multipleOf" in s else None
        if step is not None and step <= 0:
            raise ValueError(f"{where}.multipleOf must be > 0")
        self.step = Fraction(step.numerator) if step is not None and integer else step
        if not self._within(self.lo, self.hi):
            raise ValueError(f"{where}: no {'integer' if integer else 'number'} lies within its bounds"
                             + (f" that is a multiple of {s['multipleOf']}" if step is not None else ""))
        finite = [abs(b[0]) for b in (self.lo, self.hi) if abs(b[0]) != math.inf]
        self.reach = max(finite, default=0)  # past this magnitude, longer numbers change nothing

    def viable(self, text: str) -> bool:
        """Can a number that starts with text (a sign, digits, a dot, digits; no exponent) be within bounds?"""
        neg = text.startswith("-")
        body = text[1:] if neg else text
        if "." in body:
            whole, frac = body.split(".")
            low = Fraction(f"{whole}.{frac}" if frac else whole)
            spans = [(low, low + Fraction(1, 10 ** len(frac)))]
        elif body in ("", "0"):
            spans = [(Fraction(0), math.inf if not body else Fraction(1))]
        else:
            d, spans, k = int(body), [], 0
            # (longer numbers until past the bounds' magnitudes, in spans as long as the step: they hold a multiple)
            while not spans or spans[-1][0] <= self.reach or 10 ** (k - 1) < (self.step or 0):
                spans.append((Fraction(d * 10 ** k), Fraction((d + 1) * 10 ** k)))
                k += 1
        # magnitudes [a, b) (an integer's bounds are integers: [a, b) meets them where [a, b - 1] does)
        return any(self._within(*(((-b, True), (-a, False)) if neg else ((a, False), (b, True)))) for a, b in spans)

    def done(self, text: str) -> bool:
        """Is the number text within bounds?"""
        x = Fraction(text)
        return self._within((x, False), (x, False))

    def _within(self, low: tuple, high: tuple) -> bool:
        """Do the values from low to high ((value, exclusive) each) reach within the bounds, at a multiple of the
        step where there is one?"""
        lo, hi = max(low, self.lo), min(high, self.hi, key=_upper)
        if not _meets(lo, hi):
            return False
        if self.step is None or math.inf in (-lo[0], hi[0]):  # (an open end holds multiples)
            return True
        first = math.ceil(lo[0] / self.step) * self.step  # the least multiple at or above the lower end
        if lo[1] and first == lo[0]:
            first += self.step
        return first < hi[0] or first == hi[0] and not hi[1]


def _upper(b: tuple) -> tuple:
    """The order of upper bounds: the smaller value first, at equal values the exclusive one."""
    return b[0], not b[1]


def _meets(lo: tuple, hi: tuple) -> bool:
    """Is there a value above lower bound lo and below upper bound hi ((value, exclusive) each)?"""
    return lo[0] < hi[0] or lo[0] == hi[0] and not lo[1] and not hi[1]
