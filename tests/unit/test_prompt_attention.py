"""A1111's prompt attention syntax (pipelines/prompts.py): the parser against A1111's own examples, `BREAK`,
the "Original" emphasis on the demo pipelines' encoders, and one generation through the HTTP API."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from pipelines.errors import InvalidParameter
from pipelines.prompts import (
    BREAK,
    CHUNK,
    Run,
    _chunks,
    chunked_embeds,
    needs_chunks,
    parse_prompt_attention,
    uses_attention,
)

WINDOW = CHUNK + 2


# The parser ---------------------------------------------------------------------------------------------------

# A1111's docstring examples for parse_prompt_attention, with its expected lists as written there.
A1111_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_parser_gives_a1111s_documented_lists(text, expected):
    assert [list(fragment) for fragment in parse_prompt_attention(text)] == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("", [("", 1.0)]),
    ("(word)", [("word", 1.1)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word:.5) x", [("word", 0.5), (" x", 1.0)]),
    ("(word:-1)", [("word", -1.0)]),
    ("((a:2) b:3)", [("a", 6.0), (" b", 3.0)]),
    ("[a (b:2)]", [("a ", 1 / 1.1), ("b", 2 / 1.1)]),
    ("(a:1.0)", [("a", 1.0)]),
    ("a (b:1.0) c", [("a b c", 1.0)]),  # equal weights merge back into one fragment
    ("\\\\ \\[x\\)", [("\\ [x)", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a backslash before anything else escapes nothing and is dropped
    ("a) b] c: d", [("a) b] c: d", 1.0)]),  # stray closers and colons are text
    ("a :1.2) b", [("a :1.2) b", 1.0)]),  # a weight with no `(` open is text
    ("([a:1.5)", [("a", 1.5 / 1.1)]),  # `:w)` closes the innermost `(`; the `[` stays open to the end
    ("[a", [("a", 1 / 1.1)]),
    ("(a [b", [("a ", 1.1), ("b", 1.1 / 1.1)]),
    ("(a:1e3)", [("a:1e3", 1.1)]),  # not a weight A1111 reads: the `:` is text and the `)` a plain closer
    ("(a: 1.3 ) b", [("a", 1.3), (" b", 1.0)]),  # A1111 1.10 allows spaces around the weight
    ("(a:\t2)", [("a", 2.0)]),
])
def test_parser_weights(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),  # the whitespace around it goes with it
    ("a\nBREAK\tb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), BREAK, (", b", 1.0)]),
    ("BREAK", [("", 1.0), BREAK, ("", 1.0)]),
    ("(a:1.2) BREAK b", [("a", 1.2), ("", 1.0), BREAK, ("b", 1.0)]),
    ("a break b", [("a break b", 1.0)]),  # upper case only
    ("aBREAK b_BREAK BREAKc", [("aBREAK b_BREAK BREAKc", 1.0)]),  # a whole word only
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # in brackets it gets weighted: A1111's quirk
])
def test_break(text, expected):
    assert parse_prompt_attention(text) == expected


def test_a_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(ValueError, match="not a number"):
        parse_prompt_attention("(a:1.2.3)")
    with pytest.raises(ValueError):
        parse_prompt_attention("(a:.)")


@pytest.mark.parametrize(("text", "uses"), [
    ("a red house, on a hill: at dusk", False),
    ("a) b", False),
    ("", False),
    ("a (red) house", True),
    ("(a red house:1.0)", True),  # weight 1.0, but the brackets must go
    ("\\(literal\\)", True),
    ("a BREAK b", True),
    ("a (b:1.2.3)", True),
])
def test_uses_attention(text, uses):
    assert uses_attention(text) is uses


def test_break_ends_the_chunk_and_weights_are_carried():
    comma = 99
    a, b = (1, 1.0), (2, 1.5)
    assert _chunks([a, None, b], comma) == [[a], [b]]
    assert _chunks([a, None], comma) == [[a]]  # a trailing BREAK adds no chunk
    assert _chunks([None, a], comma) == [[], [a]]  # a leading one leaves an empty chunk
    assert _chunks([None], comma) == [[]]
    assert _chunks([a, None, None, b], comma) == [[a], [], [b]]
    full = [(i, 1.2) for i in range(CHUNK)]
    assert _chunks([*full, None, b], comma) == [full, [b]]  # a full chunk then BREAK: no empty chunk between
    # the comma backtrack moves weights with their tokens
    head = [(i, 1.0) for i in range(60)] + [(comma, 1.1)]
    tail = [(i, 0.9) for i in range(100, 130)]
    assert _chunks(head + tail, comma) == [head, tail]


def _words(n: int, start: int = 100, weight: float = 1.0) -> list[tuple[int, float]]:
    return [(i, weight) for i in range(start, start + n)]


def test_an_embeddings_run_is_never_split_across_chunks():
    """A1111's tokenize_line: an embedding that does not fit ends the chunk where it stands, padded, without the
    comma backtrack, and starts the next chunk whole; before that, a full chunk is closed (with the backtrack)."""
    comma = (99, 1.0)
    run = Run(tuple(_words(4, start=500, weight=1.2)))
    # 72 tokens with a comma 11 back, then 4 vectors: the chunk ends at 72 (a plain word would backtrack instead)
    head = _words(60) + [comma] + _words(11, start=200)
    tail = _words(3, start=300)
    assert _chunks([*head, run, *tail], comma[0]) == [head, [*run.tokens, *tail]]
    # four ordinary words there fill the chunk, and the fourth moves back to the comma with the words before it
    plain = _words(4, start=500)
    assert _chunks([*head, *plain, *tail], comma[0]) == [_words(60) + [comma], [*_words(11, start=200), *plain, *tail]]
    # one that fits exactly fills the chunk; two in a row: the second starts the next chunk
    exact = _words(71)
    assert _chunks([*exact, run], comma[0]) == [[*exact, *run.tokens]]
    assert _chunks([*_words(70), run, run], comma[0]) == [[*_words(70), *run.tokens], list(run.tokens)]
    # a full chunk is closed first, by the comma backtrack when a comma is near: the run goes with the moved words
    full = _words(65) + [comma] + _words(9, start=200)
    assert _chunks([*full, run], comma[0]) == [_words(65) + [comma], [*_words(9, start=200), *run.tokens]]
    # a run that filled the chunk moves with the words after the comma when the next word backtracks
    filled = _words(60) + [comma] + _words(10, start=200)
    assert _chunks([*filled, run, (300, 1.0)], comma[0]) == [
        _words(60) + [comma], [*_words(10, start=200), *run.tokens, (300, 1.0)]]
    # BREAK before a run, and a run of a whole chunk; a longer one is an error, as in A1111
    assert _chunks([*head, None, run], comma[0]) == [head, list(run.tokens)]
    whole = Run(tuple(_words(CHUNK, start=500)))
    assert _chunks([(1, 1.0), whole], comma[0]) == [[(1, 1.0)], list(whole.tokens)]
    with pytest.raises(InvalidParameter, match="76 vectors"):
        _chunks([Run(tuple(_words(CHUNK + 1)))], comma[0])


# Embeddings on the demo pipelines -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["demo-sd15", "demo-sdxl"])
def pipe(request):
    from pipelines.builders.demo import build_demo_pipeline

    return build_demo_pipeline(request.param)


def _sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _ours(pipe, prompts: list[str], negatives: list[str] | None = None, clip_skip: int = 1) -> dict:
    negatives = negatives if negatives is not None else [""] * len(prompts)
    return chunked_embeds(pipe, prompts, negatives, clip_skip=clip_skip, sdxl=_sdxl(pipe))


def _theirs(pipe, prompts: list[str], negatives: list[str]) -> tuple:
    """diffusers' own encoding, unweighted."""
    if _sdxl(pipe):
        return pipe.encode_prompt(prompts, device=torch.device("cpu"), num_images_per_prompt=1,
                                  do_classifier_free_guidance=True, negative_prompt=negatives)
    return pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negatives)


def _emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk [1, 77, width], written out from sd_emphasis.py."""
    weighted = z * weights.reshape(1, -1, 1)
    return weighted * (z.mean() / weighted.mean())


@pytest.fixture
def biased(pipe):
    """`pipe`, its SD 1.x final layer norm given a bias for the test, as real SD 1.5's has. The demo's zero bias
    gives every position a mean of 0, and A1111's mean restoring would divide rounding errors."""
    encoder = pipe.text_encoder
    norm = None if _sdxl(pipe) else getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
    if norm is not None:
        with torch.no_grad():
            norm.bias.add_(0.25)
    yield pipe
    if norm is not None:
        with torch.no_grad():
            norm.bias.sub_(0.25)


def test_weights_follow_a1111s_original_emphasis(biased):
    """`a (red:1.5) house` is diffusers' encoding of `a red house` with A1111's emphasis applied per encoder:
    the token `red` scaled by 1.5, then the chunk's mean restored. SDXL's pooled embedding is not weighted."""
    pipe = biased
    assert len(pipe.tokenizer("a red house", add_special_tokens=False).input_ids) == 3
    plain = _theirs(pipe, ["a red house"], [""])
    ours = _ours(pipe, ["a (red:1.5) house"])
    weights = torch.ones(WINDOW)
    weights[2] = 1.5  # BOS, a, red
    widths = [pipe.text_encoder.config.hidden_size] + ([pipe.text_encoder_2.config.hidden_size] if _sdxl(pipe) else [])
    expected = torch.cat([_emphasis(z, weights) for z in plain[0].split(widths, dim=-1)], dim=-1)
    torch.testing.assert_close(ours["prompt_embeds"], expected)
    torch.testing.assert_close(ours["negative_prompt_embeds"], plain[1])
    if _sdxl(pipe):
        torch.testing.assert_close(ours["pooled_prompt_embeds"], plain[2])
        torch.testing.assert_close(ours["negative_pooled_prompt_embeds"], plain[3])


def test_weighted_differs_and_weight_one_is_the_plain_prompt(pipe):
    plain = _ours(pipe, ["a red house"])["prompt_embeds"]
    assert not torch.allclose(_ours(pipe, ["a (red) house"])["prompt_embeds"], plain)
    assert not torch.allclose(_ours(pipe, ["a [red] house"])["prompt_embeds"], plain)
    assert torch.equal(_ours(pipe, ["(a red house:1.0)"])["prompt_embeds"], plain)
    assert torch.equal(_ours(pipe, ["a (red:1.0) house"])["prompt_embeds"], plain)
    # an embedding's tokens (expanded into the text before this runs) work inside brackets too
    assert not torch.allclose(_ours(pipe, ["(a red house:1.2)"])["prompt_embeds"], plain)


def test_the_fast_path_is_taken_only_for_plain_prompts_that_fit(pipe):
    assert not needs_chunks(pipe, ["a red house", "", "fog, rain: night"])
    assert needs_chunks(pipe, ["a red house", "(fog:1.2)"])
    assert needs_chunks(pipe, ["a BREAK b"])
    assert needs_chunks(pipe, ["(a red house:1.0)"])
    assert needs_chunks(pipe, ["a red house " * 26])


def test_break_makes_a_second_chunk_and_the_negative_is_padded_to_match(pipe):
    args = _ours(pipe, ["a red house BREAK on a hill"], ["fog"])
    assert args["prompt_embeds"].shape[1] == args["negative_prompt_embeds"].shape[1] == 2 * WINDOW
    # each chunk is encoded on its own: the first is `a red house` alone, the second `on a hill` alone
    head, tail, fog, empty = (_ours(pipe, [t])["prompt_embeds"] for t in ("a red house", "on a hill", "fog", ""))
    torch.testing.assert_close(args["prompt_embeds"][:, :WINDOW], head)
    torch.testing.assert_close(args["prompt_embeds"][:, WINDOW:], tail)
    # the negative prompt gets the empty prompt's encoding appended (A1111's pad_cond_uncond)
    torch.testing.assert_close(args["negative_prompt_embeds"][:, :WINDOW], fog)
    torch.testing.assert_close(args["negative_prompt_embeds"][:, WINDOW:], empty)
    # and the other way round: a negative prompt with BREAK pads the prompt
    args = _ours(pipe, ["fog"], ["a BREAK b BREAK c"])
    assert args["prompt_embeds"].shape[1] == args["negative_prompt_embeds"].shape[1] == 3 * WINDOW
    assert _ours(pipe, ["a red house BREAK"])["prompt_embeds"].shape[1] == WINDOW  # a trailing BREAK: one chunk
    if _sdxl(pipe):
        pooled = args["pooled_prompt_embeds"]
        assert pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
        assert args["negative_pooled_prompt_embeds"].shape == pooled.shape


def test_a_shorter_prompt_of_a_batch_repeats_its_last_position(pipe):
    """As A1111's reconstruct_multicond_batch pads a batch's conds of different lengths."""
    args = _ours(pipe, ["a BREAK b", "c", "c"], ["fog", "fog", "fog"])
    embeds = args["prompt_embeds"]
    assert embeds.shape[:2] == (3, 2 * WINDOW)
    torch.testing.assert_close(embeds[1, :WINDOW], _ours(pipe, ["c"])["prompt_embeds"][0])
    assert torch.equal(embeds[1, WINDOW:], embeds[1, WINDOW - 1].expand(WINDOW, -1))
    assert torch.equal(embeds[1], embeds[2])
    assert args["negative_prompt_embeds"].shape == embeds.shape
    if _sdxl(pipe):
        assert args["pooled_prompt_embeds"].shape == (3, pipe.text_encoder_2.config.projection_dim)


def test_clip_skip_applies_to_weighted_prompts(pipe):
    one, two = (_ours(pipe, ["a (red:1.3) house"], clip_skip=n)["prompt_embeds"] for n in (1, 2))
    assert one.shape == two.shape
    assert not torch.allclose(one, two)


def test_a_malformed_weight_is_a_422_naming_its_field(pipe):
    with pytest.raises(InvalidParameter) as e:
        _ours(pipe, ["a red house"], ["(fog:1.2.3)"])
    assert e.value.field == "negative_prompt"
    assert "fog" not in e.value.message  # never the prompt in an error


# One generation through the HTTP API ----------------------------------------------------------------------------

TINY = {"steps": 2, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler"}


def _pixels(client, body: dict) -> bytes:
    r = client.post("/sdapi/v1/txt2img", json={**TINY, **body})
    assert r.status_code == 200, r.json
    return Image.open(io.BytesIO(base64.b64decode(r.json["images"][0]))).convert("RGB").tobytes()


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_a_weighted_prompt_changes_the_image(client, checkpoint):
    body = {"override_settings": {"sd_model_checkpoint": checkpoint}, "negative_prompt": "[fog]"}
    plain = _pixels(client, {**body, "prompt": "a red house on a hill"})
    weighted = _pixels(client, {**body, "prompt": "a (red:1.6) house on a [hill]"})
    assert weighted != plain
    assert _pixels(client, {**body, "prompt": "a (red:1.6) house on a [hill]"}) == weighted  # deterministic
    assert _pixels(client, {**body, "prompt": "a red house BREAK on a hill"}) != plain
