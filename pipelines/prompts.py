"""Prompts longer than the text encoder's window, encoded as A1111 encodes them.

CLIP sees 77 tokens: BOS, 75 of the prompt, EOS. diffusers cuts a longer prompt there; A1111
(modules/sd_hijack_clip.py) does not:

- the prompt's tokens are split into chunks of 75; when a chunk fills up and a comma lies within the last 20
  tokens (`comma_padding_backtrack`, 20 by default), the words after that comma move to the next chunk;
- each chunk becomes BOS + tokens + EOS, padded to 77 (with EOS for SD 1.x, with the tokenizer's pad token
  after the first EOS for SDXL's OpenCLIP encoder), and is encoded on its own;
- the encodings are concatenated along the sequence (2 chunks: 154 positions);
- every prompt of a batch gets the same number of chunks (empty chunks appended), and the negative prompts are
  padded the same way (A1111's `pad_cond_uncond`): classifier-free guidance needs one shape for both;
- SDXL's pooled embedding is the first chunk's.

Prompts within the window are not handled here: the pipeline's own encoding gives the same result for them.
Attention syntax (`(word:1.2)`, `BREAK`) is not parsed; that is the prompt-parity work.
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 75  # prompt tokens per chunk: 77 positions less BOS and EOS
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default


def needs_chunks(pipe: Any, texts: list[str]) -> bool:
    """True when any of `texts` has more than 75 tokens for one of `pipe`'s tokenizers."""
    return any(len(ids) > CHUNK for tokenizer in _tokenizers(pipe) for ids in _token_ids(tokenizer, texts))


def chunked_embeds(pipe: Any, prompts: list[str], negatives: list[str], clip_skip: int, sdxl: bool) -> dict[str, Any]:
    """Pipeline arguments (`prompt_embeds`, `negative_prompt_embeds`, and SDXL's pooled pair) encoding `prompts`
    and `negatives` in 75-token chunks. `clip_skip` is A1111's (1 = the last layer; SDXL counts from its
    penultimate layer, as A1111 and diffusers do)."""
    texts = prompts + negatives
    per_tokenizer = [[_chunks(ids, _comma_id(tokenizer)) for ids in _token_ids(tokenizer, texts)]
                     for tokenizer in _tokenizers(pipe)]
    count = max(len(chunks) for all_chunks in per_tokenizer for chunks in all_chunks)
    hidden, pooled = [], None
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    for tokenizer, encoder, all_chunks in zip(_tokenizers(pipe), encoders, per_tokenizer):
        rows = [_window(tokenizer, chunks[i] if i < len(chunks) else [])
                for chunks in all_chunks for i in range(count)]
        ids = torch.tensor(rows, dtype=torch.long, device=encoder.device)
        with torch.inference_mode():
            out = encoder(ids, output_hidden_states=True)
            if sdxl:
                states = out.hidden_states[-(clip_skip + 1)]
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, one per window
                    pooled = out[0].reshape(len(texts), count, -1)[:, 0]
            else:
                norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
                states = norm(out.hidden_states[-clip_skip])
        hidden.append(states.reshape(len(texts), count * states.shape[1], states.shape[2]))
    embeds = torch.cat(hidden, dim=-1).to(dtype=pipe.unet.dtype)
    n = len(prompts)
    args: dict[str, Any] = {"prompt_embeds": embeds[:n], "negative_prompt_embeds": embeds[n:]}
    if sdxl:
        pooled = pooled.to(dtype=pipe.unet.dtype)
        args["pooled_prompt_embeds"], args["negative_pooled_prompt_embeds"] = pooled[:n], pooled[n:]
    return args


def _tokenizers(pipe: Any) -> list[Any]:
    return [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, truncation=False).input_ids


def _comma_id(tokenizer: Any) -> int | None:
    return tokenizer.get_vocab().get(",</w>")


def _chunks(ids: list[int], comma: int | None) -> list[list[int]]:
    """`ids` split into chunks of at most 75, breaking after a comma near a chunk's end (A1111's rule).
    An empty prompt is one empty chunk."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1
    for token in ids:
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            chunk, moved = chunk[: last_comma + 1], chunk[last_comma + 1 :]
            chunks.append(chunk)
            chunk, last_comma = moved, -1
        if len(chunk) == CHUNK:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def _window(tokenizer: Any, chunk: list[int]) -> list[int]:
    """BOS + chunk + EOS, padded to 77 with the tokenizer's pad token (EOS for SD 1.x's tokenizer)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [pad] * (CHUNK - len(chunk))
