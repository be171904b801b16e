"""A1111's prompt editing: `[from:to:when]`, `[a|b]` and `AND`, as schedules of plain prompt texts.

The language (AUTOMATIC1111 v1.10.1, modules/prompt_parser.py; `use_old_scheduling` off):

- `[from:to:when]` is `from` up to step `when` and `to` after it; `[to:when]` adds `to` after `when`
  (before it: nothing), `[from::when]` removes `from` after `when`. `from` and `to` may hold further edits,
  alternations and attention syntax, which stays in the text verbatim (`[(a:1.2):b:3]`). Step `t` of a
  schedule shows `from` while `t <= when`.
- `when` is a number: with a `.` in it a fraction of the steps (`int(when * steps)`), without one a step
  number (`1e1` is step 10); `min(steps, int(...))`, and only values of 1 or more become switch points.
  With hires steps (the second pass) a fraction counts from 1.0 (`1.5` is half the hires steps, `0.5` is
  before the pass) and a step number from the end of the first pass (`25` after 20 steps is hires step 5).
  Every edit's `when` is a switch point, even one inside a branch that is never shown.
- `[a|b|c]` alternates per step (`a` at step 1, `b` at 2, ...; an empty option is an empty text), which
  makes every step a switch point.
- `(...)`, `(...:w)` and `[...]` are attention syntax, left in the text for `pipelines.prompts`; `\\x` is
  kept verbatim too (it escapes `x` from this language). Brackets, parentheses and colons that fit none of
  the above are text, and so is everything when the grammar finds no reading of the whole prompt, which
  happens for a `|` outside any complete `[a|b]` and for a lone `\\` at the end or before a line break.
- `AND` (the upper-case word) splits the prompt into parts, each with an optional trailing `:weight`
  (`a cat :1.2`, also when there is no `AND`), each scheduled on its own.

Where A1111 reads nothing it treats the prompt as text, and that is kept for prompts that do not try this
language (`red|blue`, `a\\`). A prompt that does try it raises MalformedSchedule (an HTTP 422) instead of
silently losing its edits: when the grammar finds no reading of the prompt and a `[` holds a `:` or `|`
before its matching `]` (or the end) that is not inside parentheses (`[cat|dog`, `[a:b:1] |`; `a | [(b:1.2)]`
stays text). It is raised too where A1111 fails: a `when` too large for `int()` (`1e999`), and brackets
nested deeper than A1111's parser can recurse (here: more than 100). A stray bracket alone does not stop the
reading (`a [b:c:0.5` is text, as in A1111; so is `[a:b]`, which lacks a number).

How the reading is found. A1111 parses with a lark Earley grammar in which any `[ ] ( ) :` may also be text,
so most prompts have several readings. Here a linear scan takes one: every `[` or `(` that starts a
well-formed construct (there is at most one per position) is that construct, anything else at the top level
is text. Where every bracket and colon belongs to a construct, A1111 always takes this reading too (lark
prefers the derivation of the whole prompt as one sequence). Where a stray bracket or colon sits next to an
edit (`[a:b:5]:`, `[a:b:5]((`), A1111 takes whichever reading lark's set order gives first: with the lark
1.1.2 that A1111 v1.10.1 pins, that order follows the process's string hash seed, so two A1111 processes can
disagree on such a prompt (lark 1.3 decides deterministically, but differently again). This module always
takes the construct, one of A1111's outcomes. No Earley parser also means no cubic time: lark takes minutes
on a few kilobytes of brackets. Readings are cached per text.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["MAX_DEPTH", "MalformedSchedule", "Part", "composable", "is_plain",
           "prompt_schedule", "split_and"]

MAX_DEPTH = 100  # brackets and parentheses open at once; A1111's parser dies of recursion a few hundred deep


class MalformedSchedule(ValueError):
    """A prompt that tries prompt editing but cannot be read, or one A1111 itself would fail on. The message
    says what is wrong, without the request field's name and without the prompt."""


@dataclass(frozen=True)
class Part:
    """One `AND` part of a prompt: its weight and its schedule."""

    text: str  # the part as A1111 keeps it: its `:weight` and trailing whitespace cut off
    weight: float
    schedule: tuple[tuple[int, str], ...]  # (last step, text) pairs, ascending; the last step is the step count


# The reading of a text: a sequence of strings and the two nodes below (adjacent strings merged).
@dataclass(frozen=True, slots=True)
class _Edit:
    """`[before:after:when]`; `when` is the number as written."""

    before: tuple[Any, ...]
    after: tuple[Any, ...]
    when: str


@dataclass(frozen=True, slots=True)
class _Alternation:
    """`[a|b|...]`: one option per step, in turn."""

    options: tuple[tuple[Any, ...], ...]


_Node = Union[str, _Edit, _Alternation]


@dataclass(frozen=True, slots=True)
class _Reading:
    """A text's reading: `body`, every edit's `when`, whether it alternates, or why it cannot be used."""

    body: tuple[_Node, ...]
    whens: tuple[str, ...] = ()
    alternates: bool = False
    error: str | None = None


class _TooDeep(Exception):
    """The scan went past MAX_DEPTH."""


_PLAIN_RUN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # text and escapes (`\x`, x not a line break)
_LONE_BACKSLASH = re.compile(r"(?<!\\)(?:\\\\)*\\(?=\n|\Z)")  # an odd run of `\` with nothing to escape
_SPACE = re.compile(r"\s*")
# lark's common.SIGNED_NUMBER as it compiles it: Python's first matching alternative, not the longest.
_WHEN = re.compile(r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")  # a part's trailing `:weight` (any Unicode digits, as float takes)


def _may_edit(text: str) -> bool:
    """False when `text` cannot hold an edit or alternation: no `[` is followed by a `:` or `|`."""
    start = text.find("[")
    return start >= 0 and (text.find(":", start) >= 0 or text.find("|", start) >= 0)


def _merge(items: list[_Node]) -> tuple[_Node, ...]:
    """`items` with adjacent strings joined and empty strings dropped."""
    out: list[_Node] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += item
                continue
        out.append(item)
    return tuple(out)


def _closable(text: str) -> set[int]:
    """Indices of the `[` and `(` whose closer of the same kind follows with all brackets between paired up:
    the only places a construct can start (so an unclosed run of brackets costs no recursion)."""
    closable: set[int] = set()
    open_: list[int] = []
    i = 0
    while i < len(text):
        run = _PLAIN_RUN.match(text, i)
        if run:
            i = run.end()
            continue
        char = text[i]
        if char in "[(":
            open_.append(i)
        elif char in "])":
            if open_ and text[open_[-1]] == ("[" if char == "]" else "("):
                closable.add(open_.pop())
            else:  # a wrong closer: every bracket still open around it fails
                open_.clear()
        i += 1
    return closable


class _Scan:
    """The reading, found left to right: at every `[` or `(` the one construct that starts there, if it is
    well-formed (inside a construct everything must be syntax); anything else at the top level is text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.memo: dict[int, tuple[list[_Node], int] | None] = {}  # construct at an index: (items, end) or None
        self.closable = _closable(text)

    def top(self) -> list[_Node] | None:
        """The top level's items, or None when a `|` stands outside any construct (then there is no reading)."""
        text, items, i = self.text, [], 0
        while i < len(text):
            run = _PLAIN_RUN.match(text, i)
            if run:
                items.append(run.group())
                i = run.end()
                continue
            char = text[i]
            found = self.construct(i, 1) if char in "[(" else None
            if found:
                items.extend(found[0])
                i = found[1]
                continue
            if char == "|":
                return None
            items.append(char)  # a stray `[ ] ( ) :` is text here (the caller has ruled out a lone backslash)
            i += 1
        return items

    def sequence(self, i: int, depth: int) -> tuple[list[_Node], int] | None:
        """Text and constructs from `i` up to the first `] ) : |` at this level (or the end): (items, index)."""
        text, items = self.text, []
        while i < len(text):
            run = _PLAIN_RUN.match(text, i)
            if run:
                items.append(run.group())
                i = run.end()
            elif text[i] in "[(":
                found = self.construct(i, depth + 1)
                if found is None:
                    return None
                items.extend(found[0])
                i = found[1]
            else:
                break
        return items, i

    def construct(self, start: int, depth: int) -> tuple[list[_Node], int] | None:
        """The construct at `start` (a `[` or `(`) as (items to splice in, index after it), or None."""
        if start not in self.closable:
            return None
        if start in self.memo:
            return self.memo[start]
        if depth > MAX_DEPTH:
            raise _TooDeep
        found = self._parse_at(start, depth)
        self.memo[start] = found
        return found

    def _parse_at(self, start: int, depth: int) -> tuple[list[_Node], int] | None:
        text = self.text
        first = self.sequence(start + 1, depth)
        if first is None or first[1] >= len(text):
            return None
        items, i = first
        closer = text[i]
        if text[start] == "(":
            if closer == ")":
                return ["(", *items, ")"], i + 1
            if closer != ":":
                return None
            second = self.sequence(i + 1, depth)
            if second is None or second[1] >= len(text) or text[second[1]] != ")":
                return None
            return ["(", *items, ":", *second[0], ")"], second[1] + 1
        if closer == "]":
            return ["[", *items, "]"], i + 1
        if closer == "|":
            options = [items]
            while text[i] == "|":
                nxt = self.sequence(i + 1, depth)
                if nxt is None or nxt[1] >= len(text):
                    return None
                options.append(nxt[0])
                i = nxt[1]
            if text[i] != "]":
                return None
            return [_Alternation(tuple(_merge(option) for option in options))], i + 1
        if closer != ":":
            return None
        when = self._when(i + 1)  # `[to:when]`
        if when is not None:
            return [_Edit((), _merge(items), when[0])], when[1]
        second = self.sequence(i + 1, depth)  # `[from:to:when]`
        if second is None or second[1] >= len(text) or text[second[1]] != ":":
            return None
        when = self._when(second[1] + 1)
        if when is None:
            return None
        return [_Edit(_merge(items), _merge(second[0]), when[0])], when[1]

    def _when(self, i: int) -> tuple[str, int] | None:
        """`[whitespace] number [whitespace] ]` at `i`: (number, index after the `]`), or None."""
        text = self.text
        number = _WHEN.match(text, _SPACE.match(text, i).end())
        if number is None:
            return None
        end = _SPACE.match(text, number.end()).end()
        if end < len(text) and text[end] == "]":
            return number.group(), end + 1
        return None


def _tries_editing(text: str) -> bool:
    """True when a `[` holds a `:` or `|` before its matching `]` or the end, outside parentheses within it."""
    parens: list[int] = []  # per open `[`: the parentheses open inside it
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            parens.append(0)
        elif char == "]" and parens:
            parens.pop()
        elif parens and char == "(":
            parens[-1] += 1
        elif parens and char == ")" and parens[-1]:
            parens[-1] -= 1
        elif parens and char in ":|" and not parens[-1]:
            return True
        i += 1
    return False


def _collect(items: tuple[_Node, ...], whens: list[str]) -> bool:
    """Append every edit's `when` in `items` (nested ones too) to `whens`; True when any alternation is met."""
    alternates = False
    for item in items:
        if isinstance(item, _Edit):
            whens.append(item.when)
            alternates |= _collect(item.before, whens)
            alternates |= _collect(item.after, whens)
        elif isinstance(item, _Alternation):
            alternates = True
            for option in item.options:
                _collect(option, whens)
    return alternates


@functools.lru_cache(maxsize=1024)
def _read_text(text: str) -> _Reading:
    """The reading of a text `_may_edit` lets through (errors are cached as readings too)."""
    plain = _Reading((text,) if text else ())
    items = None
    if _LONE_BACKSLASH.search(text) is None:
        try:
            items = _Scan(text).top()
        except _TooDeep:
            return _Reading((), error=f"brackets nested more than {MAX_DEPTH} deep")
    if items is None:  # no reading at all: A1111 keeps the text, unless it tries prompt editing
        if _tries_editing(text):
            why = "a lone '\\' at the end" if _LONE_BACKSLASH.search(text) else "a '|' outside any complete [a|b]"
            return _Reading((), error=f"unreadable prompt editing: a '[' holds ':' or '|' but {why} stops "
                                      "the prompt from parsing")
        return plain
    body = _merge(items)
    if all(isinstance(item, str) for item in body):
        return plain
    whens: list[str] = []
    alternates = _collect(body, whens)
    for when in whens:
        if math.isinf(float(when)):
            return _Reading((), error=f"the step {when[:24]!r} of a [from:to:when] is too large")
    return _Reading(body, tuple(whens), alternates)


def _reading(text: str) -> _Reading:
    return _read_text(text) if _may_edit(text) else _Reading((text,) if text else ())


def _switch_step(when: str, steps: int, base_steps: int | None) -> int:
    """A1111's step for `when`: a fraction of `steps` with a `.`, else a step number; hires counts on from
    `base_steps` (fractions from 1.0). May be below 1 (never reached) and is at most `steps`."""
    value = float(when)
    if "." in when:
        value = (value - (1.0 if base_steps is not None else 0)) * steps
    else:
        value = value - (base_steps if base_steps is not None else 0)
    if not math.isfinite(value):
        raise MalformedSchedule(f"the step {when[:24]!r} of a [from:to:when] is too large")
    return min(steps, int(value))


def _render(items: tuple[_Node, ...], step: int, switches: dict[str, int], out: list[str]) -> None:
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Edit):
            _render(item.before if step <= switches[item.when] else item.after, step, switches, out)
        else:
            _render(item.options[(step - 1) % len(item.options)], step, switches, out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's get_learned_conditioning_prompt_schedules for one prompt (use_old_scheduling off): (last step,
    text) pairs, ascending, the last at `steps` (`hires_steps` when given: the schedule of the hires pass after
    `steps` first-pass steps). `AND` is not split here. Raises MalformedSchedule (module docstring)."""
    reading = _reading(prompt)
    if reading.error is not None:
        raise MalformedSchedule(reading.error)
    total, base = (steps, None) if hires_steps is None else (hires_steps, steps)
    if not reading.whens and not reading.alternates:
        return [(total, prompt)]
    switches = {when: _switch_step(when, total, base) for when in reading.whens}
    points = {total, *(step for step in switches.values() if step >= 1)}
    if reading.alternates:
        points.update(range(1, total + 1))
    schedule = []
    for step in sorted(points):
        out: list[str] = []
        _render(reading.body, step, switches, out)
        schedule.append((step, "".join(out)))
    return schedule


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A1111's `AND` split (get_multicond_prompt_list for one prompt): (text, weight) per part, in order, with
    duplicates. A trailing `:number` is the part's weight (default 1.0) and is cut off with the trailing
    whitespace, also when there is no `AND` (`'a cat :1.2'` -> `[('a cat', 1.2)]`); leading whitespace stays."""
    parts = []
    for piece in _AND.split(prompt):
        # A1111 matches `^(.*?)(?:\s*:\s*(number))?\s*$`, which backtracks in quadratic time over long runs of
        # whitespace; the same split in linear time: the number, if any, follows the last colon.
        text = piece.rstrip()
        colon = text.rfind(":")
        weight = _WEIGHT.fullmatch(text[colon + 1:].lstrip()) if colon >= 0 else None
        if weight is not None:
            text = text[:colon].rstrip()
        parts.append((text, float(weight.group()) if weight is not None else 1.0))
    return parts


def composable(prompt: str, steps: int, hires_steps: int | None = None) -> list[Part]:
    """split_and, then prompt_schedule of each part (A1111's get_multicond_learned_conditioning, less the
    encoding). Raises MalformedSchedule for any part that does."""
    return [Part(text, weight, tuple(prompt_schedule(text, steps, hires_steps))) for text, weight in split_and(prompt)]


def is_plain(prompt: str) -> bool:
    """True when `prompt` uses none of this language, for any step count: then `composable(prompt, steps)` is
    `[Part(prompt.strip(), 1.0, ((steps, prompt.strip()),))]`. That is: no `AND`, no trailing `:weight`, no
    leading whitespace (A1111 keeps it in the part, so the part would not equal `prompt.strip()`), and no
    edit or alternation in the reading (a prompt that raises MalformedSchedule is not plain). Cheap for text
    without `[`, `:` and `AND`; otherwise the reading is cached per text."""
    if "[" not in prompt and ":" not in prompt and "AND" not in prompt:
        return prompt.strip() == prompt.rstrip()
    parts = split_and(prompt)
    if len(parts) != 1 or parts[0] != (prompt.strip(), 1.0):
        return False
    reading = _reading(parts[0][0])
    return reading.error is None and not reading.whens and not reading.alternates
