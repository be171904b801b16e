"""A1111's prompt editing (pipelines/prompt_schedule.py): A1111's own examples, a corpus of A1111's outputs on
random prompts (tests/data/prompt_schedules_a1111.json), `is_plain`, and the MalformedSchedule rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.prompt_schedule import (
    MAX_DEPTH,
    MalformedSchedule,
    Part,
    composable,
    is_plain,
    prompt_schedule,
    split_and,
)

CORPUS = json.loads((Path(__file__).parents[1] / "data" / "prompt_schedules_a1111.json").read_text(encoding="utf-8"))


# A1111's examples ---------------------------------------------------------------------------------------------

_FANTASY = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[: in background:0.25] [shoddy:masterful:0.5]")
_ALTERNATE_B = [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"], [8, "(b:1.1)"],
                [9, "a"], [10, "(b:1.1)"]]

# The docstring of get_learned_conditioning_prompt_schedules, (prompt, steps, hires steps, expected as written
# there), and the example in the comment above it (100 steps).
A1111_EXAMPLES = [
    ("test", 10, None, [[10, "test"]]),
    ("a [b:3]", 10, None, [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", 10, None, [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", 10, None, [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", 10, None, [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", 10, None, [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", 10, None, [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", 10, None, [[10, "a [unbalanced"]]),
    ("a [b:.5] c", 10, None, [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", 10, None, [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", 10, None, _ALTERNATE_B),
    ("[fe|]male", 10, None, [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                             [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", 10, None, [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                               [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
    ("a [b:.5] c", 10, 10, [[10, "a b c"]]),
    ("a [b:1.5] c", 10, 10, [[5, "a  c"], [10, "a b c"]]),
    (_FANTASY, 100, None, [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"]]),
]


@pytest.mark.parametrize(("prompt", "steps", "hires", "expected"), A1111_EXAMPLES)
def test_a1111s_documented_schedules(prompt, steps, hires, expected):
    assert prompt_schedule(prompt, steps, hires) == [tuple(entry) for entry in expected]


def test_a1111s_unhandled_docstring_example_is_malformed():
    """The docstring also has `g("a [{b|d{:.5] c")  # not handling this right now` -> [[5, 'a  c'], [10, 'a {b|d{ c']],
    which A1111 v1.10.1 does not give (its doctest fails there): its parser finds no reading (a `|` outside any
    [a|b]) and it uses the text. The `[` holds `:` and `|`, so here that is MalformedSchedule."""
    with pytest.raises(MalformedSchedule):
        prompt_schedule("a [{b|d{:.5] c", 10)


# A1111's outputs on random prompts ----------------------------------------------------------------------------

def _expected(entry):
    return MalformedSchedule if isinstance(entry, dict) else [tuple(step) for step in entry]


def _outcome(call, *args):
    try:
        return call(*args)
    except MalformedSchedule:
        return MalformedSchedule


def test_corpus_is_as_documented():
    """600 prompts (53 written, the rest random), each at 1, 7 and 20 steps and 20 + 10 hires steps. 488 match
    A1111 as they stand. 72 raise MalformedSchedule where A1111 finds no reading and uses the text (`sdfunc`;
    89 prompts have no reading). 40 have stray brackets or colons next to an edit, where A1111's reading depends
    on its hash seed (`a1111`: its outcomes under 8 seeds); `schedules` is then the reading that takes every
    construct, which is always one of A1111's outcomes. 23 prompt/step pairs (6 prompts) crash A1111 with an
    infinite `when` and raise MalformedSchedule. 283 prompts have `AND` parts or a trimmed part text."""
    prompts = CORPUS["prompts"]
    assert len(prompts) == 600
    assert sum(not rec.get("sdfunc") and "a1111" not in rec for rec in prompts) == 488
    assert sum(rec.get("sdfunc") == "MalformedSchedule" for rec in prompts) == 72
    assert sum(bool(rec.get("text_fallback")) for rec in prompts) == 89
    assert all(rec.get("text_fallback") for rec in prompts if rec.get("sdfunc"))
    seed_dependent = [rec for rec in prompts if "a1111" in rec]
    assert len(seed_dependent) == 40
    assert all(len(rec["a1111"]) > 1 and rec["schedules"] in rec["a1111"] for rec in seed_dependent)
    assert sum(isinstance(entry, dict) for rec in prompts for entry in rec["schedules"]) == 23
    assert sum("part_schedules_7" in rec for rec in prompts) == 283


def test_corpus_schedules_match_a1111():
    """Every prompt and step count gives the corpus schedule, or MalformedSchedule where it says so."""
    mismatches = []
    for rec in CORPUS["prompts"]:
        for (steps, hires), entry in zip(CORPUS["steps"], rec["schedules"]):
            expected = MalformedSchedule if rec.get("sdfunc") else _expected(entry)
            got = _outcome(prompt_schedule, rec["prompt"], steps, hires)
            if got != expected:
                mismatches.append((rec["prompt"], steps, hires, expected, got))
    assert not mismatches, mismatches[:5]


def test_corpus_and_split_matches_a1111():
    mismatches = [(rec["prompt"], rec["and"], split_and(rec["prompt"])) for rec in CORPUS["prompts"]
                  if split_and(rec["prompt"]) != [tuple(part) for part in rec["and"]]]
    assert not mismatches, mismatches[:5]


def test_corpus_composable_matches_a1111():
    """Each `AND` part scheduled on its own (7 steps); MalformedSchedule where a part raises it."""
    mismatches = []
    for rec in CORPUS["prompts"]:
        prompt = rec["prompt"]
        if "part_schedules_7" in rec:
            entries = rec["part_schedules_7"]
            malformed = rec.get("sdfunc_parts") or any(isinstance(entry, dict) for entry in entries)
            expected = MalformedSchedule if malformed else [
                Part(text, weight, tuple(_expected(entry))) for (text, weight), entry in zip(rec["and"], entries)]
        else:  # one part, the prompt itself with weight 1.0
            entry = rec["schedules"][CORPUS["steps"].index([7, None])]
            malformed = rec.get("sdfunc") or isinstance(entry, dict)
            expected = MalformedSchedule if malformed else [Part(prompt, 1.0, tuple(_expected(entry)))]
        got = _outcome(composable, prompt, 7)
        if got != expected:
            mismatches.append((prompt, expected, got))
    assert not mismatches, mismatches[:5]


def test_is_plain_is_exactly_no_change_on_the_corpus():
    """is_plain(p) holds exactly when composable(p, steps) is the one plain Part, for every corpus prompt."""
    wrong = []
    for rec in CORPUS["prompts"]:
        p = rec["prompt"]
        for steps in (1, 7, 20):
            plain = _outcome(composable, p, steps) == [Part(p.strip(), 1.0, ((steps, p.strip()),))]
            if is_plain(p) != plain:
                wrong.append((p, steps, is_plain(p)))
    assert not wrong, wrong[:5]
    assert 100 < sum(is_plain(rec["prompt"]) for rec in CORPUS["prompts"]) < len(CORPUS["prompts"])


# Semantics ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "steps", "hires", "expected"), [
    ("a [b:c:5] d", 3, None, [(3, "a b d")]),  # one entry, but not the prompt's text
    ("[a:b:0]", 5, None, [(5, "b")]),  # `when` below 1: never before
    ("[a:b:-1]", 5, None, [(5, "b")]),
    ("[a:b:5]", 5, None, [(5, "a")]),  # `when` == steps: always before
    ("[a:b:100]", 5, None, [(5, "a")]),  # min(steps, when)
    ("[a:b:1e1]", 20, None, [(10, "a"), (20, "b")]),  # no '.': a step number
    ("[a:b:1.]", 4, None, [(4, "a")]),  # a '.': a fraction
    ("[a:b:0.99]", 7, None, [(6, "a"), (7, "b")]),  # int(0.99 * 7) = 6
    ("[a:b:1.5]", 20, 10, [(5, "a"), (10, "b")]),  # hires: fractions count from 1.0
    ("[a:b:25]", 20, 10, [(5, "a"), (10, "b")]),  # hires: step numbers from the end of the first pass
    ("[a:b:15]", 20, 10, [(10, "b")]),
    ("[a::2] [:c:3]", 4, None, [(2, "a "), (3, " "), (4, " c")]),
    ("[[a:b:1]:2]", 3, None, [(1, ""), (2, ""), (3, "b")]),  # every `when` is a switch point
    ("[a|b|c]", 4, None, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
    ("[a|b]", 1, None, [(1, "a")]),
    ("[a: b :3 ]", 4, None, [(3, "a"), (4, " b ")]),
    ("\\[a:b:1\\]", 4, None, [(4, "\\[a:b:1\\]")]),  # escaped: text, backslashes kept
    ("[a\\:b:c:1]", 2, None, [(1, "a\\:b"), (2, "c")]),
    ("[(a:1.2) [b]:c:1]", 2, None, [(1, "(a:1.2) [b]"), (2, "c")]),  # attention syntax kept verbatim
    ("[a:b:1]((", 3, None, [(1, "a(("), (3, "b((")]),  # A1111: this, or the text, as its hash seed falls
    ("[cat:dog:2]: a", 3, None, [(2, "cat: a"), (3, "dog: a")]),  # likewise
    ("a [b:c:0.5", 4, None, [(4, "a [b:c:0.5")]),  # unclosed, yet the grammar reads it (as text)
    ("[a:b] c", 4, None, [(4, "[a:b] c")]),  # no number: text
    ("red|blue", 4, None, [(4, "red|blue")]),  # no reading, no `[`: text
    ("a | [(b:1.2)]", 4, None, [(4, "a | [(b:1.2)]")]),  # the ':' is inside parentheses: text
    ("a\\", 4, None, [(4, "a\\")]),
])
def test_schedules(prompt, steps, hires, expected):
    assert prompt_schedule(prompt, steps, hires) == expected


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat", [("a cat", 1.0)]),
    ("a cat :1.2", [("a cat", 1.2)]),
    ("  a cat  ", [("  a cat", 1.0)]),  # leading whitespace stays
    ("a AND b:2 AND  c :-0.5 ", [("a", 1.0), (" b", 2.0), ("  c", -0.5)]),
    ("a [b:c:0.5", [("a [b:c", 0.5)]),  # an unclosed edit's number is the part's weight
    ("ANDROID", [("ANDROID", 1.0)]),
    ("AND", [("", 1.0), ("", 1.0)]),
    ("a:1.", [("a", 1.0)]),
    ("(a:1.2)", [("(a:1.2)", 1.0)]),
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


def test_composable():
    assert composable("a [b:c:2] AND d:0.5", 4) == [
        Part("a [b:c:2]", 1.0, ((2, "a b"), (4, "a c"))), Part(" d", 0.5, ((4, " d"),))]


# is_plain -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [
    "", "a cat", "a cat   ", "a cat, (detailed:1.2), [blurry]", "((masterpiece)), [[x]]", "ANDROID", "a: b",
    "red|blue", "a\\", "a [b:c:0.5 d", "[a:b] c", "\\[a:b:1\\]", "a | [(b:1.2)]", "   ",
])
def test_is_plain(prompt):
    assert is_plain(prompt)
    assert composable(prompt, 9) == [Part(prompt.strip(), 1.0, ((9, prompt.strip()),))]


@pytest.mark.parametrize("prompt", [
    " a cat",  # A1111 keeps the leading space in the part
    "a cat :1.2", "a cat:1", "a AND b", "AND", "[a:b:5]", "a [b:c:5] d", "[a:b:0]", "[a|b]", "[a|]", "[a:b:1]((",
    "[cat|dog", "[a:b:1e999]",
    "a [b:c:0.5",  # ('a [b:c', 0.5) by the weight rule
])
def test_is_not_plain(prompt):
    assert not is_plain(prompt)


# MalformedSchedule --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "steps"), [
    ("[cat|dog", 20),  # unclosed alternation
    ("a [b:c:1] |", 20),  # a stray '|' stops the whole prompt from parsing, the edit with it
    ("a [b:c:1] \\", 20),  # so does a trailing backslash
    ("[a:(b|c):1]", 20),
    ("[a:b:1e999]", 1),  # A1111: OverflowError from int()
    ("[a:b:-1e999]", 1),
    ("[a:b:1.5e308]", 7),  # 1.5e308 * 7 overflows
    ("x AND [cat|dog", 20),
    ("[" * (MAX_DEPTH + 1) + "a:b:1" + "]" * (MAX_DEPTH + 1), 20),
])
def test_malformed(prompt, steps):
    with pytest.raises(MalformedSchedule) as caught:
        composable(prompt, steps)
    assert isinstance(caught.value, ValueError)
    assert prompt not in str(caught.value) and "prompt:" not in str(caught.value)


def test_overflow_depends_on_steps_as_in_a1111():
    assert prompt_schedule("[a:b:1.5e308]", 1) == [(1, "a")]


def test_deep_well_formed_nesting_within_the_limit():
    deep = "(" * (MAX_DEPTH - 1) + "[a:b:1]" + ")" * (MAX_DEPTH - 1)
    assert prompt_schedule(deep, 2) == [(1, deep.replace("[a:b:1]", "a")), (2, deep.replace("[a:b:1]", "b"))]


def test_long_prompts_take_linear_time():
    """A1111's Earley parser takes minutes on a few kilobytes of brackets, and its `:weight` regex quadratic time
    on long whitespace; these 20 kB prompts take milliseconds (a regression would hang here)."""
    prompt = ", ".join(["(masterpiece:1.2)", "[cat:dog:0.5]", "[red|blue] hair", "((detailed))", "x: (", "]"] * 400)
    assert len(prompt) > 20_000
    assert len(prompt_schedule(prompt, 20)) == 20
    assert not is_plain(prompt)
    spaces = "[a:" + " " * 20_000 + "b:1] c"
    assert composable(spaces, 2) == [Part(spaces, 1.0, ((1, "a c"), (2, " " * 20_000 + "b c")))]
    assert prompt_schedule("[a:b:1]" + "(" * 20_000, 2)[0] == (1, "a" + "(" * 20_000)


def test_imports_neither_torch_nor_handler():
    code = ("import sys, pipelines.prompt_schedule as ps; ps.composable('a [b:c:0.5] AND (d:1.2)', 20); "
            "assert not {'torch', 'handler', 'lark'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
