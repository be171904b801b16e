"""Prompts encoded as A1111 encodes them: attention syntax, `BREAK`, and prompts past CLIP's 77-token window.

A1111 (modules/prompt_parser.py, sd_hijack_clip.py, sd_emphasis.py) does this with its "Original" emphasis,
the default:

- `parse_prompt_attention` splits a prompt into (text, weight) fragments: `(a)` x1.1, `[a]` x1/1.1, `(a:1.3)`
  x1.3, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal (a lone backslash is dropped), brackets
  left open weight the rest of the prompt, a stray closing bracket is text, the upper-case word `BREAK` becomes
  the marker `("BREAK", -1.0)`, and neighbours of equal weight merge. Being A1111's list, its quirks come
  along: a `BREAK` inside brackets gets weighted, stops being the marker, and is encoded as the word "break".
- each fragment is tokenized on its own and every token carries its fragment's weight; the tokens are cut into
  chunks of 75: when a chunk fills up and a comma lies within its last 20 tokens (`comma_padding_backtrack`),
  the words after that comma move to the next chunk; a `BREAK` ends the chunk where it stands; a
  textual-inversion embedding's vectors stay together: one that does not fit ends the chunk where it stands
  (no comma backtrack) and starts the next;
- each chunk becomes BOS + tokens + EOS, padded to 77 (with EOS for SD 1.x and SDXL's CLIP-L, with the
  tokenizer's pad token after the first EOS for SDXL's OpenCLIP encoder; BOS, EOS and padding weigh 1.0),
  and is encoded on its own; then emphasis: `z * weight` per position, rescaled so the chunk's mean over
  all positions and channels is what it was before weighting. SDXL does this per encoder; its pooled
  embedding is the first chunk's, unweighted;
- a prompt's chunk encodings are concatenated along the sequence (2 chunks: 154 positions). Shorter prompts of
  a batch repeat their last position up to the longest (A1111's `reconstruct_multicond_batch`), and the side
  with fewer chunks, prompts or negative prompts, gets the encoding of an empty prompt appended per missing
  chunk (A1111's `pad_cond_uncond`): the pipeline's classifier-free guidance needs one shape for both.

A prompt without this syntax that fits the window is left to the pipeline's own encoding, which gives the same
result (`needs_chunks` says which). The `compel` library is not used: its syntax differs (`word++`,
`(word)1.3`), and it has neither A1111's mean-restoring emphasis nor `BREAK` and the comma backtrack.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.adapters.embeddings import vector_tokens
from pipelines.errors import InvalidParameter

if TYPE_CHECKING:  # torch is imported where tensors are made: the parser must not pull it into a request thread
    import torch

CHUNK = 75  # prompt tokens per chunk: 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
ROUND = 1.1  # `(text)`
SQUARE = 1 / 1.1  # `[text]`: a multiplication by this constant, as A1111 does, so weights match to the bit
BREAK = ("BREAK", -1.0)  # A1111's chunk-break marker in the parsed list

Fragment = tuple[str, float]
Token = tuple[int, float]  # a token id and its weight


@dataclass(frozen=True)
class Run:
    """The tokens of one mention of a textual-inversion embedding, one per vector: chunked as a whole."""

    tokens: tuple[Token, ...]


# A1111's tokens, in its order: escapes (a backslash before anything else escapes nothing), openers,
# `:weight)`, closers, plain text, a lone colon.
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_SYNTAX = re.compile(r"[()\[\]\\]|BREAK")  # text without these parses to itself, weight 1.0


def parse_prompt_attention(text: str) -> list[Fragment]:
    """`text` as A1111's (text, weight) fragments, `BREAK` as the `BREAK` marker; never empty (`""` gives
    `[("", 1.0)]`). A weight that is not a number, such as `(a:1.2.3)`, raises ValueError (A1111 fails there
    too)."""
    parts: list[list[Any]] = []  # [text, weight]; weights change in place as brackets close
    rounds: list[int] = []  # where each open `(` started in `parts`
    squares: list[int] = []

    def scale(start: int, by: float) -> None:
        for part in parts[start:]:
            part[1] *= by

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(parts))
        elif token == "[":
            squares.append(len(parts))
        elif weight is not None and rounds:
            scale(rounds.pop(), _number(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(list(BREAK))
                parts.append([piece, 1.0])
    for start in rounds:  # unbalanced: the multiplier reaches the end of the prompt
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    merged: list[list[Any]] = []
    for part in parts or [["", 1.0]]:
        if merged and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return [(t, w) for t, w in merged]


def uses_attention(text: str) -> bool:
    """True when `text` holds attention syntax or `BREAK` that changes it: anything but one fragment equal to
    `text` with weight 1.0 (so `(a:1.0)`, which must lose its brackets, counts; a malformed weight counts)."""
    if not _SYNTAX.search(text):
        return False
    try:
        return parse_prompt_attention(text) != [(text, 1.0)]
    except ValueError:
        return True


def needs_chunks(pipe: Any, texts: list[str]) -> bool:
    """True when any of `texts` needs `chunked_embeds`: it uses attention syntax or `BREAK`, or has more than
    75 tokens for one of `pipe`'s tokenizers. False means the pipeline's own encoding equals A1111's."""
    if any(uses_attention(text) for text in texts):
        return True
    return any(len(ids) > CHUNK for tokenizer in _tokenizers(pipe) for ids in _token_ids(tokenizer, texts))


def chunked_embeds(pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int, sdxl: bool) -> dict[str, Any]:
    """Pipeline arguments (`prompt_embeds`, `negative_prompt_embeds`, and SDXL's pooled pair) encoding `prompts`
    and `negatives` as A1111 does: attention weights, `BREAK`, 75-token chunks, both sides padded to one length.
    `clip_skip` is A1111's (1 = the last layer; SDXL counts from its penultimate layer, as diffusers does).
    A malformed attention weight is an InvalidParameter naming `prompt` or `negative_prompt`."""
    texts = list(dict.fromkeys(prompts + negatives))  # each distinct text is encoded once
    fields = dict.fromkeys(negatives, "negative_prompt")
    fields.update(dict.fromkeys(prompts, "prompt"))
    hidden, pooled, empty_chunk = encode_texts(pipe, texts, fields, clip_skip, sdxl)
    per_text = dict(zip(texts, hidden))
    sides = [stack_rows([per_text[t] for t in prompts]), stack_rows([per_text[t] for t in negatives])]
    length = max(side.shape[1] for side in sides)
    sides = [pad_chunks(side, empty_chunk, length) for side in sides]
    dtype = pipe.unet.dtype
    args: dict[str, Any] = {"prompt_embeds": sides[0].to(dtype=dtype),
                            "negative_prompt_embeds": sides[1].to(dtype=dtype)}
    if sdxl:
        index = {text: i for i, text in enumerate(texts)}
        args["pooled_prompt_embeds"] = pooled[[index[t] for t in prompts]].to(dtype=dtype)
        args["negative_pooled_prompt_embeds"] = pooled[[index[t] for t in negatives]].to(dtype=dtype)
    return args


def encode_texts(pipe: Any, texts: list[str], fields: dict[str, str], clip_skip: int,
                 sdxl: bool) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Each of `texts` (distinct) encoded as A1111 encodes one prompt: its hidden states [chunks * 77, width]
    (SDXL's two encoders side by side), its pooled embedding (SDXL: a [len(texts), width] tensor, the first
    chunk's, unweighted; else None), and the empty prompt's chunk [77, width] that pads a shorter side.
    `fields[text]` names the request field a malformed attention weight in `text` is reported on."""
    import torch

    fragments = {text: _parse(text, fields.get(text, "prompt")) for text in texts}
    pairs = [(tok, enc) for tok, enc in ((pipe.tokenizer, pipe.text_encoder),
                                         (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)))
             if tok is not None and enc is not None][: 2 if sdxl else 1]  # the SDXL refiner has OpenCLIP only
    tokenizers, encoders = [tok for tok, _ in pairs], [enc for _, enc in pairs]
    per_tokenizer = [[_chunks(_weighted_tokens(tokenizer, fragments[text]), comma) for text in texts]
                     for tokenizer, comma in ((tok, _comma_id(tok)) for tok in tokenizers)]  # get_vocab() is slow
    counts = [max(len(chunks[i]) for chunks in per_tokenizer) for i in range(len(texts))]
    firsts = [sum(counts[:i]) for i in range(len(texts))]  # each text's first window
    hidden, empty, pooled = [], [], None
    for tokenizer, encoder, all_chunks in zip(tokenizers, encoders, per_tokenizer):
        windows = [_window(tokenizer, chunks[k] if k < len(chunks) else [])
                   for chunks, count in zip(all_chunks, counts) for k in range(count)]
        windows.append(_window(tokenizer, []))  # the empty prompt, for padding
        states, text_embeds = _encode(encoder, windows, clip_skip, sdxl)
        if text_embeds is not None:
            pooled = text_embeds[firsts]
        hidden.append(list(states[:-1].split(counts)))
        empty.append(states[-1])
    per_text = [torch.cat([parts[i].flatten(0, 1) for parts in hidden], dim=-1) for i in range(len(texts))]
    return per_text, pooled, torch.cat(empty, dim=-1)


def scheduled_texts(text: str, steps: int, hires_steps: int | None, field: str) -> list[tuple[int, str]]:
    """A1111's prompt-editing schedule of `text` (pipelines.prompt_schedule); a malformed schedule is an
    InvalidParameter naming `field`."""
    from pipelines.prompt_schedule import MalformedSchedule, prompt_schedule

    try:
        return prompt_schedule(text, steps, hires_steps)
    except MalformedSchedule as e:
        raise InvalidParameter(f"{field}: {e}", field=field) from None


def scheduled_parts(text: str, steps: int, hires_steps: int | None, field: str) -> list[tuple[str, float, list]]:
    """`text`'s `AND` parts as (text, weight, schedule); a malformed schedule is an InvalidParameter naming
    `field`."""
    from pipelines.prompt_schedule import MalformedSchedule, composable

    try:
        return [(part.text, part.weight, list(part.schedule)) for part in composable(text, steps, hires_steps)]
    except MalformedSchedule as e:
        raise InvalidParameter(f"{field}: {e}", field=field) from None


def check_prompt(text: str, field: str, steps: int, *, negative: bool = False,
                 hires_steps: int | None = None) -> None:
    """Raise InvalidParameter naming `field` when `text` is a malformed schedule or one of the texts it
    schedules over `steps` holds an attention weight that is not a number (A1111 fails on those too), so that a
    request is refused before any device work. The message never quotes the prompt."""
    if negative:
        entries = scheduled_texts(text, steps, hires_steps, field)
    else:
        entries = [entry for _, _, schedule in scheduled_parts(text, steps, hires_steps, field) for entry in schedule]
    for _, entry in entries:
        try:
            parse_prompt_attention(entry)
        except ValueError:
            raise InvalidParameter(f"{field}: an attention weight such as (word:1.2) is not a number",
                                   field=field) from None


def _number(weight: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"attention weight '{weight}' is not a number") from None


def _parse(text: str, field: str) -> list[Fragment]:
    try:
        return parse_prompt_attention(text)
    except ValueError as e:
        raise InvalidParameter(f"{field}: {e}", field=field) from None


def _tokenizers(pipe: Any) -> list[Any]:
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, truncation=False).input_ids


def _comma_id(tokenizer: Any) -> int | None:
    return tokenizer.get_vocab().get(",</w>")


def _weighted_tokens(tokenizer: Any, fragments: list[Fragment]) -> list[Token | Run | None]:
    """Each fragment tokenized on its own (as A1111 does: `a(b)` is two words), its tokens carrying its
    weight; a textual-inversion embedding's tokens (as `expand_prompt` writes them) as one Run; None where a
    `BREAK` marker stands."""
    vectors = vector_tokens(tokenizer)
    tokens: list[Token | Run | None] = []
    for (text, weight), ids in zip(fragments, _token_ids(tokenizer, [text for text, _ in fragments])):
        if (text, weight) == BREAK:
            tokens.append(None)
            continue
        i = 0
        while i < len(ids):
            n = _run_length(ids, i, vectors) if vectors else 0
            if n:
                tokens.append(Run(tuple((token, weight) for token in ids[i : i + n])))
                i += n
            else:
                tokens.append((ids[i], weight))
                i += 1
    return tokens


def _run_length(ids: Sequence[int], start: int, vectors: dict[int, tuple[str, int]]) -> int:
    """How many of `ids` from `start` are one embedding: its vector 0 there, then its vectors 1, 2 ... in order
    (a mention; the next mention of the same embedding starts again at 0). 0 when no embedding starts there."""
    first = vectors.get(ids[start])
    if first is None or first[1] != 0:
        return 0
    n = 1
    while start + n < len(ids) and vectors.get(ids[start + n]) == (first[0], n):
        n += 1
    return n


def _chunks(tokens: Sequence[Token | Run | None], comma: int | None) -> list[list[Token]]:
    """`tokens` split into chunks of at most 75, breaking after a comma near a chunk's end and at each None
    (`BREAK`), by A1111's rules. An empty prompt is one empty chunk; a trailing `BREAK` adds none. A Run (one
    embedding's vectors) is never split: where it does not fit, the chunk ends before it (padded; no comma
    backtrack) and the Run starts the next one; the comma backtrack moves a Run with the words around it (A1111
    moves placeholder `!` tokens there and leaves the vectors in the old chunk's padding: a defect not
    reproduced). A Run longer than 75 is an InvalidParameter (A1111 fails on it)."""
    chunks: list[list[Token]] = []
    chunk: list[Token] = []
    last_comma = -1
    for item in tokens:
        if item is None:
            chunks.append(chunk)
            chunk, last_comma = [], -1
            continue
        run = item.tokens if isinstance(item, Run) else (item,)
        if run[0][0] == comma:
            last_comma = len(chunk)
        elif len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            chunks.append(chunk[: last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1 :], -1
        if len(run) > CHUNK:
            raise InvalidParameter(f"prompt: an embedding of {len(run)} vectors is longer than a prompt chunk "
                                   f"({CHUNK} tokens); A1111 cannot encode it either", field="prompt")
        if len(chunk) + len(run) > CHUNK:  # a token: the chunk is full; a Run: it would not fit
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.extend(run)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _window(tokenizer: Any, chunk: list[Token]) -> tuple[list[int], list[float]]:
    """BOS + chunk + EOS, padded to 77 with the tokenizer's pad token (EOS for SD 1.x's tokenizer), and the
    weights of those 77 positions."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id, *(token for token, _ in chunk), tokenizer.eos_token_id]
    ids += [pad] * (CHUNK - len(chunk))
    weights = [1.0, *(weight for _, weight in chunk)] + [1.0] * (CHUNK + 1 - len(chunk))
    return ids, weights


def _encode(encoder: Any, windows: list[tuple[list[int], list[float]]], clip_skip: int,
            sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [windows, 77, width] with emphasis applied, and the projected text embeddings [windows,
    width] where `encoder` has a projection (SDXL's second)."""
    import torch

    ids = torch.tensor([w[0] for w in windows], dtype=torch.long, device=encoder.device)
    weights = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=encoder.device)
    text_embeds = None
    with torch.inference_mode():
        out = encoder(ids, output_hidden_states=True)
        if sdxl:
            states = out.hidden_states[-(clip_skip + 1)]
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, one per window, never weighted
                text_embeds = out[0]
        else:
            norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            states = norm(out.hidden_states[-clip_skip])
        weighted = (weights != 1.0).any(dim=1)
        if weighted.any():  # unweighted windows stay bit-exact (the rescale would multiply by mean/mean)
            z = states[weighted].float()
            before = z.mean(dim=(1, 2), keepdim=True)
            z = z * weights[weighted].unsqueeze(-1)
            ratio = before / z.mean(dim=(1, 2), keepdim=True)
            # A chunk whose mean is ~0 (random-weight encoders such as the demo's; never a trained CLIP) would be
            # scaled by ~1/0: there the weighted values are kept as they are instead of becoming inf or NaN.
            sane = torch.isfinite(ratio) & (ratio > 0.1) & (ratio < 10.0)
            z = torch.where(sane, z * ratio, z)
            states = states.clone()
            states[weighted] = z.to(states.dtype)
    return states, text_embeds


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """[positions, width] encodings as a batch, the shorter ones repeating their last position (A1111's
    `stack_conds`)."""
    import torch

    length = max(row.shape[0] for row in rows)
    return torch.stack([torch.cat([row, row[-1:].expand(length - row.shape[0], -1)]) for row in rows])


def pad_chunks(side: torch.Tensor, empty_chunk: torch.Tensor, length: int) -> torch.Tensor:
    """`side` [batch, positions, width] with the empty prompt's chunk appended up to `length` positions."""
    import torch

    missing = (length - side.shape[1]) // empty_chunk.shape[0]
    if not missing:
        return side
    pad = empty_chunk.repeat(missing, 1).unsqueeze(0).expand(side.shape[0], -1, -1)
    return torch.cat([side, pad], dim=1)
