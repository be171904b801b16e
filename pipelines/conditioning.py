"""Conditioning that changes during sampling: A1111's prompt editing `[a:b:when]`, alternation `[a|b]` and
composable diffusion `a AND b :1.2`, on diffusers' pipelines.

A1111 (modules/sd_samplers_cfg_denoiser.py `CFGDenoiser`) picks, on every call of the denoiser, each prompt's
conditioning for the call's index (`step`, from 0, one per model call: a second-order sampler calls twice per
step, and its schedules are laid over `steps * 2`), by the first schedule entry whose `end_at_step` is at least
that index. For `AND` it runs the model once per part and per image, plus the unconditional side, and combines
`uncond + sum(weight_i * cfg_scale * (cond_i - uncond))`.

diffusers' pipelines encode the prompt once and call the UNet with `[uncond, cond]` (`cond` alone without
classifier-free guidance), then form `uncond + g * (cond - uncond)`. `StepConditioning.applied` stands in for
the UNet's `forward` for one pipeline call: it counts the calls, puts the call's conditioning (hidden states
and, for SDXL, the pooled embedding) in place of the pipeline's, and for `AND` widens the batch to one row per
part, runs the real UNet once, and hands the pipeline `uncond + sum(w_i * (cond_i - uncond))` as the "cond" half,
so the pipeline's own guidance yields A1111's sum. A ControlNet sees each call's first part. Rows of a batch
are independent: images with different prompts and schedules share every UNet call (the dynamic batcher's groups
included).

Texts are encoded as A1111 encodes them (pipelines.prompts): the entries of one prompt's schedule are padded to
one length with the empty prompt's chunk, prompts of one call repeat their last position to the longest (its
`stack_conds`), and the shorter of cond and uncond gets empty chunks (`pad_cond_uncond`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.prompt_schedule import is_plain
from pipelines.prompts import encode_texts, pad_chunks, scheduled_parts, scheduled_texts, stack_rows

Schedule = tuple[tuple[int, int], ...]  # (end_at_step, index of the encoded entry)


@dataclass(frozen=True)
class _Row:
    """One image: its prompt's parts (schedule, weight) and its negative prompt's schedule."""

    parts: tuple[tuple[Schedule, float], ...]
    negative: Schedule


def is_dynamic(prompts: Sequence[str], negatives: Sequence[str]) -> bool:
    """True when any prompt uses prompt editing, alternation, `AND` or a trailing `:weight` (A1111 reads it as
    the composable weight even without `AND`), or any negative prompt uses prompt editing or alternation."""
    return not all(is_plain(p) for p in prompts) or not all(_negative_plain(n) for n in negatives)


def _negative_plain(text: str) -> bool:
    """A negative prompt has schedules but never `AND` parts (A1111 encodes it with get_learned_conditioning).
    Two steps show any schedule: alternation gives two entries, and prompt editing always drops its brackets."""
    if "[" not in text:
        return True
    schedule = scheduled_texts(text, 2, None, "negative_prompt")
    return len(schedule) == 1 and schedule[0][1] == text


def schedule_steps(steps: int, second_order: bool) -> int:
    """The length A1111 lays schedules over: the model calls of `steps` (two per step for second-order samplers)."""
    return steps * 2 if second_order else steps


class StepConditioning:
    """The conditioning of one pipeline call's batch, per model call. `build` makes one; `pipeline_args` are
    what the pipeline is called with (the first call's conditioning, for its shapes and checks); `applied(pipe)`
    installs it for the call. `calls` counts the model calls made; `start` is the index of the first one (a
    refiner that continues a pass continues its count)."""

    def __init__(self, hidden: list[torch.Tensor], pooled: list[torch.Tensor] | None, empty: torch.Tensor,
                 rows: list[_Row], guidance: float, zero_uncond: bool, dtype: torch.dtype, start: int = 0) -> None:
        self.hidden, self.pooled, self.empty = hidden, pooled, empty
        self.rows, self.guidance, self.zero_uncond, self.dtype = rows, guidance, zero_uncond, dtype
        self.start = self.calls = start
        self.composite = any(len(row.parts) != 1 or row.parts[0][1] != 1.0 for row in rows)
        self._cache: dict[tuple[int, ...], Any] = {}

    def select(self, i: int) -> StepConditioning:
        """The same conditioning for image `i` of the batch alone (one-image pipeline calls)."""
        return StepConditioning(self.hidden, self.pooled, self.empty, [self.rows[i]], self.guidance,
                                self.zero_uncond, self.dtype, self.start)

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(cond [parts of every row, L, W], their pooled, uncond [rows, L, W], its pooled) for model call
        `step`, cond and uncond padded to one length L. Parts are in row order, each row's in prompt order."""
        conds = [_pick(schedule, step) for row in self.rows for schedule, _ in row.parts]
        unconds = [_pick(row.negative, step) for row in self.rows]
        key = (*conds, -1, *unconds)
        if key not in self._cache:
            cond, uncond = stack_rows([self.hidden[i] for i in conds]), stack_rows([self.hidden[i] for i in unconds])
            length = max(cond.shape[1], uncond.shape[1])
            cond, uncond = pad_chunks(cond, self.empty, length), pad_chunks(uncond, self.empty, length)
            cond_pooled = uncond_pooled = None
            if self.pooled is not None:
                cond_pooled = torch.stack([self.pooled[i] for i in conds])
                uncond_pooled = torch.stack([self.pooled[i] for i in unconds])
            if self.zero_uncond:
                uncond = torch.zeros_like(uncond)
                uncond_pooled = None if uncond_pooled is None else torch.zeros_like(uncond_pooled)
            self._cache[key] = tuple(None if t is None else t.to(self.dtype) for t in
                                     (cond, cond_pooled, uncond, uncond_pooled))
        return self._cache[key]

    def _firsts(self) -> list[int]:
        """Each row's first part, as an index into `at`'s cond."""
        firsts, at = [], 0
        for row in self.rows:
            firsts.append(at)
            at += len(row.parts)
        return firsts

    def pipeline_args(self, sdxl: bool) -> dict[str, Any]:
        """The pipeline's prompt arguments: the first call's first parts and uncond, one row per image."""
        cond, cond_pooled, uncond, uncond_pooled = self.at(self.start)
        firsts = self._firsts()
        args: dict[str, Any] = {"prompt_embeds": cond[firsts], "negative_prompt_embeds": uncond}
        if sdxl:
            args["pooled_prompt_embeds"] = cond_pooled[firsts]
            args["negative_pooled_prompt_embeds"] = uncond_pooled
        return args

    @contextlib.contextmanager
    def applied(self, pipe: Any) -> Iterator[StepConditioning]:
        """`pipe`'s UNet (and ControlNet) take this conditioning per call for the duration of the block; the
        shared modules are restored after it, whatever happens. For the device thread only."""
        with _patched(pipe.unet, self._unet), _patched(getattr(pipe, "controlnet", None), self._controlnet):
            yield self

    # The UNet's stand-in ------------------------------------------------------------------------------------

    def _unet(self, forward: Callable[..., Any], sample: torch.Tensor, timestep: Any,
              encoder_hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        step = self.calls
        self.calls += 1
        batch = len(self.rows)
        guided = sample.shape[0] == 2 * batch
        cond, cond_pooled, uncond, uncond_pooled = self.at(step)
        if not self.composite:
            states = torch.cat([uncond, cond]) if guided else cond
            pooled = (torch.cat([uncond_pooled, cond_pooled]) if guided else cond_pooled) if self.pooled else None
            _set_pooled(kwargs, pooled)
            return forward(sample, timestep, states.to(encoder_hidden_states.device), *args, **kwargs)
        # AND: uncond rows, then one row per part of each image, in one UNet call
        own = [batch + i if guided else i for i in range(batch)]  # each image's row of `sample` on the cond side
        index = list(range(batch)) + [own[i] for i, row in enumerate(self.rows) for _ in row.parts]
        pick = torch.tensor(index, device=sample.device)
        n = sample.shape[0]
        if isinstance(timestep, torch.Tensor) and timestep.ndim and timestep.shape[0] == n:
            timestep = timestep[pick]
        for key in ("timestep_cond", "mid_block_additional_residual"):
            if isinstance(kwargs.get(key), torch.Tensor):
                kwargs[key] = kwargs[key][pick]
        for key in ("down_block_additional_residuals", "down_intrablock_additional_residuals"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(t[pick] for t in kwargs[key])
        added = kwargs.get("added_cond_kwargs")
        if added:
            added = dict(added)
            if isinstance(added.get("time_ids"), torch.Tensor):
                added["time_ids"] = added["time_ids"][pick]
            kwargs["added_cond_kwargs"] = added
        if self.pooled is not None:
            _set_pooled(kwargs, torch.cat([uncond_pooled, cond_pooled]))
        return_dict = kwargs.pop("return_dict", True)
        states = torch.cat([uncond, cond]).to(encoder_hidden_states.device)
        out = forward(sample[pick], timestep, states, *args, return_dict=False, **kwargs)[0]
        out_uncond, out_cond = out[:batch], out[batch:]
        combined = out_uncond.clone()
        at = 0
        for i, row in enumerate(self.rows):
            for _, weight in row.parts:
                combined[i] += (out_cond[at] - out_uncond[i]) * weight
                at += 1
        if guided:
            result = torch.cat([out_uncond, combined])
        else:  # no guidance in the pipeline: A1111's uncond + cfg_scale * sum(...) here
            result = out_uncond + (combined - out_uncond) * self.guidance
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=result)
        return (result,)

    def _controlnet(self, forward: Callable[..., Any], sample: torch.Tensor, timestep: Any, *args: Any,
                    encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        cond, cond_pooled, uncond, uncond_pooled = self.at(self.calls)  # the UNet call that follows
        firsts = self._firsts()
        batch = len(self.rows)
        guided = encoder_hidden_states.shape[0] == 2 * batch
        states = torch.cat([uncond, cond[firsts]]) if guided else cond[firsts]
        if self.pooled is not None:
            _set_pooled(kwargs, torch.cat([uncond_pooled, cond_pooled[firsts]]) if guided else cond_pooled[firsts])
        return forward(sample, timestep, *args, encoder_hidden_states=states.to(encoder_hidden_states.device),
                       **kwargs)


def _set_pooled(kwargs: dict[str, Any], pooled: torch.Tensor | None) -> None:
    added = kwargs.get("added_cond_kwargs")
    if pooled is None or not added or "text_embeds" not in added:
        return
    kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled.to(added["text_embeds"].device)}


@contextlib.contextmanager
def _patched(module: Any, stand_in: Callable[..., Any]) -> Iterator[None]:
    """`module.forward` replaced by `stand_in(original_forward, ...)` for the block, then restored exactly."""
    if module is None:
        yield
        return
    own = module.__dict__.get("forward")  # an instance attribute already there (hooks) is put back as it was
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        return stand_in(original, *args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _pick(schedule: Schedule, step: int) -> int:
    for end, index in schedule:
        if step <= end:
            return index
    return schedule[-1][1]


def build(pipe: Any, prompts: Sequence[str], negatives: Sequence[str], *, steps: int, hires_steps: int | None,
          clip_skip: int, sdxl: bool, guidance: float, expand: Callable[[str], str],
          fields: tuple[str, str] = ("prompt", "negative_prompt"), start: int = 0) -> StepConditioning:
    """The per-call conditioning of one batch (`prompts[i]`, `negatives[i]` for image i). `steps` and
    `hires_steps` are what A1111 lays schedules over (`schedule_steps`; `hires_steps` for a hires pass, whose
    `when` counts from the first pass's end); `expand` turns a text into what the tokenizer reads (textual
    inversion); `fields` name the prompt fields for errors. SDXL with every negative prompt empty gets zeros
    for the unconditional side, as A1111 (and pipelines.generate for plain prompts) does."""
    texts: list[str] = []  # distinct encoded entries, each padded within its schedule group
    groups: list[list[int]] = []
    keys: dict[tuple[str, str], int] = {}

    def group(entries: list[tuple[int, str]]) -> Schedule:
        expanded = [(end, expand(text)) for end, text in entries]
        name = "\0".join(dict.fromkeys(text for _, text in expanded))  # the same text in another group pads apart
        members = []
        for _, text in expanded:
            if (name, text) not in keys:
                keys[(name, text)] = len(texts)
                texts.append(text)
                members.append(keys[(name, text)])
        if members:
            groups.append(members)
        return tuple((end, keys[(name, text)]) for end, text in expanded)

    rows = []
    for prompt, negative in zip(prompts, negatives):
        parts = tuple((group(schedule), weight)
                      for _, weight, schedule in scheduled_parts(prompt, steps, hires_steps, fields[0]))
        rows.append(_Row(parts=parts, negative=group(scheduled_texts(negative, steps, hires_steps, fields[1]))))
    field_of = {text: fields[0] for text in texts}
    for row in rows:
        for _, index in row.negative:
            field_of.setdefault(texts[index], fields[1])
    unique = list(dict.fromkeys(texts))
    encoded, pooled, empty = encode_texts(pipe, unique, field_of, clip_skip, sdxl)
    by_text = dict(zip(unique, encoded))
    hidden = [by_text[text] for text in texts]
    for members in groups:  # A1111 encodes a prompt's schedule as one batch: shorter entries get empty chunks
        length = max(hidden[i].shape[0] for i in members)
        for i in members:
            hidden[i] = pad_chunks(hidden[i].unsqueeze(0), empty, length)[0]
    pooled_rows = None
    if pooled is not None:
        at = {text: i for i, text in enumerate(unique)}
        pooled_rows = [pooled[at[text]] for text in texts]
    zero_uncond = sdxl and not any(negatives)
    return StepConditioning(hidden, pooled_rows, empty, rows, guidance, zero_uncond, pipe.unet.dtype, start)
