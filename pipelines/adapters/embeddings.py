"""Textual-inversion embeddings as A1111 offers them: files under `<data>/embeddings`, used by writing the
file's stem in a prompt.

- `EmbeddingStore` scans the folder (sub-folders too; `.safetensors` only: pickle files can run code, so they are
  logged and listed nowhere) reading each file's safetensors header alone, and learns its layout: one tensor
  (`emb_params`, any single key, or `string_to_param.*`) of shape `[vectors, dim]` or `[dim]` for one text
  encoder, or `clip_l` + `clip_g` for SDXL's two. An embedding *fits* a model when its per-encoder widths
  (`dims`) equal the model's text-encoder widths (`encoder_dims`): (768,) for SD 1.x, (768, 1280) for SDXL,
  whatever the tiny demo models have. `listing()` is A1111's `GET /embeddings` body.
- `mentioned()` finds the embeddings a prompt uses. A1111 tokenizes the prompt and the names with CLIP's
  tokenizer and matches token ids, so matching is case-insensitive (CLIP lower-cases) and a name matches only
  where its ends fall on CLIP pre-token boundaries: a run of letters, a run of other symbols (`_`, `-`, `.` ...)
  can't continue past a matching end, while digits are single tokens and need no boundary (`badhandv4` is
  found in `badhandv45`, `neg` is not found in `negative`, `EasyNegative` is found in `(easynegative:1.2)`).
  Whitespace inside a name matches any whitespace. The longest name wins where several start at one place.
  The approximation: A1111 can also match where byte-pair merges happen to line up inside a word.
- `ensure_loaded()` puts the vectors into the pipeline's text encoder(s), once per encoder module (a
  checkpoint's pipelines share their encoders and every checkpoint of an architecture shares one tokenizer).
  Each vector gets an internal added token `<ti-{sha1(name)[:10]}-{i}>` rather than the name itself, which is
  what lets a name that is also an ordinary word (`cat`: diffusers' `load_textual_inversion` refuses it) work as
  it does in A1111, keeps matching case-insensitive, and lets one tokenizer serve several encoders.
  `expand_prompt()` rewrites each mention into those tokens (all `n` of a multi-vector embedding), so it must
  run on every prompt and negative prompt the pipeline sees, `pipe(prompt=...)` and hand-made embeddings alike.
  `vector_tokens()` tells those tokens apart again: pipelines/prompts.py keeps each mention's run of them in one
  75-token chunk, as A1111 does.
- `ti_hashes()` is the infotext's `TI hashes` value: `name: sha256[:12]` per embedding used.

Loading mutates shared modules: call `ensure_loaded` on the device thread (it also takes a lock). Added rows
are never removed; a file changed on disk is reloaded into the same tokens on its next use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidParameter
from pipelines.hashing import HashCache
from pipelines.safetensors_header import read_header
from pipelines.store import scan_safetensors

log = logging.getLogger(__name__)

RECHECK_SECONDS = 5.0  # how often a job may look for new embedding files

Dims = tuple[int, ...]  # the token-embedding width of each text encoder, in the pipeline's encoder order
ARCH_DIMS: dict[str, Dims] = {"sd1": (768,), "sdxl": (768, 1280)}  # the real architectures we serve
SDXL_KEYS = ("clip_l", "clip_g")  # A1111's SDXL layout: text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
_TOKEN_FORM = re.compile(r"<ti-[0-9a-f]{10}-\d+>", re.IGNORECASE)  # our internal tokens, should a prompt spell one
_TOKEN_PARTS = re.compile(r"<ti-([0-9a-f]{10})-(\d+)>")  # an added token as `EmbeddingEntry.tokens` spells it
FIELD = "prompt"


@dataclass(frozen=True)
class EmbeddingEntry:
    """One embedding file. `name` is the file stem (A1111's name); `keys` the tensor feeding each text encoder
    and `dims` its width; `vectors` the tokens it stands for. `stamp` (size, mtime_ns) tells a changed file."""

    name: str
    path: Path
    keys: tuple[str, ...]
    dims: Dims
    vectors: int
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    stamp: tuple[int, int] = (0, 0)

    @property
    def shape(self) -> int:
        """A1111's `shape`: the vector width, both encoders' added up for SDXL (768 + 1280 = 2048)."""
        return sum(self.dims)

    @property
    def arch(self) -> str | None:
        """"sd1" or "sdxl" when the widths are a real architecture's; None otherwise (SD 2.x's 1024 ...)."""
        return next((arch for arch, dims in ARCH_DIMS.items() if dims == self.dims), None)

    def fits(self, dims: Sequence[int]) -> bool:
        """True when this embedding can go into text encoders of these widths."""
        return self.dims == tuple(dims)

    @property
    def tokens(self) -> list[str]:
        """The internal added tokens of its vectors (the same strings in every tokenizer)."""
        digest = hashlib.sha1(self.name.encode("utf-8")).hexdigest()[:10]
        return [f"<ti-{digest}-{i}>" for i in range(self.vectors)]

    def listed(self) -> dict[str, Any]:
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.vectors}


# reading files ---------------------------------------------------------------------------------------------------
def layout(tensors: dict[str, dict[str, Any]]) -> tuple[tuple[str, ...], Dims, int]:
    """(keys, dims, vectors) of an embedding file's tensors, as A1111 and diffusers read them:
    `clip_l` + `clip_g` (SDXL), else the one `string_to_param` tensor, else the file's only float tensor.
    Raises ValueError naming what is wrong."""
    floats = {k: [int(s) for s in v["shape"]] for k, v in tensors.items() if v.get("dtype") in _FLOAT_DTYPES}
    if all(k in floats for k in SDXL_KEYS):
        keys: tuple[str, ...] = SDXL_KEYS
    else:
        params = [k for k in floats if k == "string_to_param" or k.startswith("string_to_param.")]
        if len(params) == 1:
            keys = (params[0],)
        elif len(floats) == 1 and not params:
            keys = (next(iter(floats)),)
        else:
            raise ValueError(f"no single embedding tensor among its {len(tensors)} tensor(s)")
    dims: list[int] = []
    counts: set[int] = set()
    for key in keys:
        shape = floats[key]
        if len(shape) == 1:
            shape = [1, *shape]
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise ValueError(f"tensor '{key}' has shape {floats[key]}, not [vectors, width] or [width]")
        counts.add(shape[0])
        dims.append(shape[1])
    if len(counts) != 1:
        raise ValueError("clip_l and clip_g have different numbers of vectors")
    return keys, tuple(dims), counts.pop()


def _read_entry(path: Path) -> EmbeddingEntry:
    header = read_header(path)
    tensors, meta = header.tensors, header.metadata
    keys, dims, vectors = layout(tensors)
    st = path.stat()
    step = _int_or_none(meta.get("step"))
    if step is None and "step" in tensors:
        step = _scalar_tensor(path, "step")
    return EmbeddingEntry(
        name=path.stem, path=path, keys=keys, dims=dims, vectors=vectors, step=step,
        sd_checkpoint=meta.get("sd_checkpoint") or meta.get("hash") or None,
        sd_checkpoint_name=meta.get("sd_checkpoint_name") or None, stamp=(st.st_size, st.st_mtime_ns))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(float(value)) if value not in (None, "", "None", "null") else None
    except (TypeError, ValueError):
        return None


def _scalar_tensor(path: Path, key: str) -> int | None:
    """A one-element tensor's value (A1111 `.pt` files converted to safetensors may keep `step` as a tensor)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            value = f.get_tensor(key)
        return int(value.reshape(-1)[0].item()) if value.numel() == 1 else None
    except Exception:  # noqa: BLE001 - informational only
        return None


# matching names in prompts -----------------------------------------------------------------------------------
_LETTER = r"[^\W\d_]"


def _edge(char: str, before: bool) -> str:
    """The lookaround that keeps CLIP's pre-tokenizer from running past a name's end at `char`."""
    if char.isalpha():
        return rf"(?<!{_LETTER})" if before else rf"(?!{_LETTER})"
    if char.isdigit() or char.isspace():
        return ""
    return r"(?<![^\w\s])(?<!_)" if before else r"(?![^\w\s])(?!_)"


def _name_pattern(name: str) -> str:
    name = name.strip()
    body = r"\s+".join(re.escape(part) for part in name.split())
    return _edge(name[0], True) + body + _edge(name[-1], False)


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


class _Matcher:
    """One compiled alternation over some names (longest first) and the entry each matched text means."""

    def __init__(self, entries: Iterable[EmbeddingEntry]) -> None:
        self.by_text: dict[str, EmbeddingEntry] = {}
        for entry in entries:
            if entry.name.strip():
                self.by_text.setdefault(_normal(entry.name), entry)  # case variants: the first file wins, as in A1111
        names = sorted((e.name for e in self.by_text.values()), key=lambda n: (-len(n), n))
        self.regex = re.compile("|".join(f"(?:{_name_pattern(n)})" for n in names), re.IGNORECASE) if names else None

    def find(self, text: str) -> Iterable[tuple[re.Match[str], EmbeddingEntry]]:
        if self.regex is None or not text:
            return
        for match in self.regex.finditer(text):
            entry = self.by_text.get(_normal(match.group(0)))
            if entry is not None:
                yield match, entry


# the store ---------------------------------------------------------------------------------------------------
class EmbeddingStore:
    """The embedding files under `root`, rescanned by `refresh()` (POST /refresh-embeddings) or, cheaply, by
    `refresh_if_changed()` when a folder's mtime moved (A1111 picks up new files without a refresh). Thread-safe.
    `hashes` gives the full-file sha256 for `TI hashes` (the checkpoints' HashCache will do)."""

    def __init__(self, root: Path, hash_cache: HashCache) -> None:
        self.root = Path(root)
        self.hashes = hash_cache
        self._lock = threading.Lock()
        self._entries: dict[str, EmbeddingEntry] = {}
        self._matchers: dict[Dims, _Matcher] = {}
        self._signature: tuple | None = None  # None: not scanned yet (the first use scans, not the constructor)
        self._checked_at = float("-inf")

    def refresh(self) -> None:
        """Rescan the folder."""
        signature = self._folder_signature()
        entries: dict[str, EmbeddingEntry] = {}
        for path in scan_safetensors(self.root, "embedding"):
            rel = path.relative_to(self.root)
            try:
                if path.stat().st_size == 0:
                    continue
                entry = _read_entry(path)
            except (OSError, ValueError) as e:
                log.warning("embedding %s is not offered: %s", rel, e)
                continue
            if entry.name in entries:
                log.warning("embedding %s has the name of %s and is not offered", rel,
                            entries[entry.name].path.relative_to(self.root))
                continue
            entries[entry.name] = entry
        with self._lock:
            self._entries, self._matchers, self._signature = entries, {}, signature
        log.info("found %d embedding(s)", len(entries))

    def refresh_if_changed(self) -> bool:
        """Rescan when the folder or a sub-folder's mtime changed since the last scan, looking at most every
        RECHECK_SECONDS (a walk of the folders on a network mount); True when it rescanned. (An in-place rewrite
        of a file is seen by `refresh()` only, as in A1111.)"""
        now = time.monotonic()
        if self._signature is not None and now - self._checked_at < RECHECK_SECONDS:
            return False
        self._checked_at = now
        if self._folder_signature() == self._signature:
            return False
        self.refresh()
        return True

    def _ensure_scanned(self) -> None:
        if self._signature is None:
            self.refresh()

    def _folder_signature(self) -> tuple:
        if not self.root.is_dir():
            return ()
        out = []
        for folder, dirs, _files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            try:
                out.append((folder, os.stat(folder).st_mtime_ns))
            except OSError:
                pass
        return tuple(out)

    @property
    def entries(self) -> list[EmbeddingEntry]:
        self._ensure_scanned()
        with self._lock:
            return list(self._entries.values())

    def get(self, name: str) -> EmbeddingEntry | None:
        self._ensure_scanned()
        with self._lock:
            return self._entries.get(name)

    def listing(self, dims: Sequence[int] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """A1111's `GET /sdapi/v1/embeddings` body. `loaded`: the embeddings that fit text encoders of `dims`
        (the current model's `encoder_dims`); `skipped`: the rest. With `dims` None (no model loaded yet),
        `loaded` holds every embedding that fits an architecture we serve (`ARCH_DIMS`): SD 1.x and SDXL
        embeddings alike, SD 2.x ones skipped."""
        self._ensure_scanned()
        wanted = tuple(dims) if dims is not None else None
        loaded: dict[str, dict[str, Any]] = {}
        skipped: dict[str, dict[str, Any]] = {}
        for entry in self.entries:
            fits = entry.fits(wanted) if wanted is not None else entry.arch is not None
            (loaded if fits else skipped)[entry.name] = entry.listed()
        return {"loaded": loaded, "skipped": skipped}

    def _matcher(self, dims: Dims) -> _Matcher:
        self._ensure_scanned()
        with self._lock:
            matcher = self._matchers.get(dims)
            if matcher is None:
                matcher = self._matchers[dims] = _Matcher(e for e in self._entries.values() if e.fits(dims))
            return matcher

    def mentioned(self, texts: Iterable[str], dims: Sequence[int]) -> list[EmbeddingEntry]:
        """The embeddings fitting `dims` that `texts` (prompts and negative prompts, extra-network tags already
        removed) name, each once, in order of first mention. Matching is as the module docstring says; an
        embedding that does not fit is plain text, as in A1111."""
        matcher = self._matcher(tuple(dims))
        found: dict[str, EmbeddingEntry] = {}
        for text in texts:
            for _match, entry in matcher.find(text):
                found.setdefault(entry.name, entry)
        return list(found.values())

    def prepare(self, pipe: Any, texts: Iterable[str]) -> list[EmbeddingEntry]:
        """Device thread, per job: pick up new files, find the embeddings `texts` name for `pipe`'s encoders and
        load them (`ensure_loaded`, also when none is named: it keeps the encoders as wide as the tokenizers)."""
        self.refresh_if_changed()
        entries = self.mentioned(list(texts), encoder_dims(pipe))
        ensure_loaded(pipe, entries)
        return entries

    def ti_hashes(self, entries: Sequence[EmbeddingEntry]) -> str | None:
        """The infotext's `TI hashes` value, `name: sha256[:12]` per embedding (`:` and `,` removed from the name
        as A1111 does); None when there is none. A file gone since is left out (A1111 skips unhashable ones)."""
        parts = []
        for entry in entries:
            try:
                sha = self.hashes.sha256(entry.path)
            except OSError:
                log.warning("embedding %s is no longer on the mount; left out of TI hashes", entry.name)
                continue
            parts.append(f"{entry.name.replace(':', '').replace(',', '')}: {sha[:12]}")
        return ", ".join(parts) or None


# the pipeline side -------------------------------------------------------------------------------------------
_LOAD_LOCK = threading.RLock()
# text-encoder module -> embedding name -> (file stamp, token ids): what each encoder holds. Weak, because the
# encoders belong to the pipeline cache; keyed by the encoder because several pipelines share one.
_LOADED: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[int, int], tuple[int, ...]]]] = weakref.WeakKeyDictionary()


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs in the order of `EmbeddingEntry.keys` (SDXL: clip_l, then clip_g)."""
    pairs = []
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tok is not None and enc is not None:
            pairs.append((tok, enc))
    return pairs


def encoder_dims(pipe: Any) -> Dims:
    """The token-embedding width of each of `pipe`'s text encoders: what an embedding must have to fit."""
    return tuple(int(enc.get_input_embeddings().embedding_dim) for _tok, enc in _encoders(pipe))


def _widen(tokenizer: Any, encoder: Any) -> None:
    """Give `encoder` a row for every token `tokenizer` has (other pipelines may have added some), and make
    its pooled output take the end-of-text position rather than the highest token id (configs with the old
    `eos_token_id` 2 do the latter, which lands on an added token: SDXL's pooled embedding would go wrong)."""
    from transformers import CLIPTextModel

    if encoder.get_input_embeddings().num_embeddings < len(tokenizer):
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    eos = tokenizer.eos_token_id
    for module in encoder.modules():
        if isinstance(module, CLIPTextModel) and getattr(module, "eos_token_id", None) == 2 and eos is not None:
            module.eos_token_id = eos  # same position for prompts without added tokens: EOS is the highest id


def _vectors(entry: EmbeddingEntry, dims: Dims) -> list[Any]:
    """The file's vectors per encoder as float32 [vectors, width]; damaged or changed files -> InvalidParameter."""
    import torch
    from safetensors import safe_open

    def bad(why: str) -> InvalidParameter:
        return InvalidParameter(f"{FIELD}: embedding '{entry.name}' {why}", field=FIELD)

    try:
        with safe_open(str(entry.path), framework="pt", device="cpu") as f:
            raw = [f.get_tensor(key) for key in entry.keys]
    except FileNotFoundError:
        raise bad("is no longer on the mount; refresh the embeddings") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise bad(f"cannot be read ({type(e).__name__}); the file is damaged or was replaced") from None
    out = []
    for key, tensor, dim in zip(entry.keys, raw, dims):
        vec = tensor.to(torch.float32)
        if vec.dim() == 1:
            vec = vec.unsqueeze(0)
        if vec.dim() != 2 or vec.shape[0] != entry.vectors:
            raise bad(f"changed on disk ('{key}' is now {list(tensor.shape)}); refresh the embeddings")
        if vec.shape[1] != dim:
            raise bad(f"has {vec.shape[1]}-wide vectors in '{key}'; this checkpoint's text encoder takes {dim}")
        if not torch.isfinite(vec).all():
            raise bad(f"has non-finite values in '{key}'")
        out.append(vec)
    return out


def ensure_loaded(pipe: Any, entries: Sequence[EmbeddingEntry]) -> None:
    """Put `entries` into `pipe`'s tokenizer(s) and text encoder(s), once per encoder module: each vector is an
    added token (`EmbeddingEntry.tokens`) whose input-embedding row holds it, in the encoder's dtype and device.
    SDXL: `clip_l` goes to text_encoder, `clip_g` to text_encoder_2. Idempotent; a file whose stamp changed is
    reloaded. An embedding that does not fit, or whose file is damaged -> InvalidParameter naming it (field
    `prompt`); nothing is half loaded for it. Device thread (mutates shared modules)."""
    import torch

    pairs = _encoders(pipe)
    dims = encoder_dims(pipe)
    with _LOAD_LOCK:
        for tok, enc in pairs:
            _widen(tok, enc)
        for entry in entries:
            if not entry.fits(dims):
                raise InvalidParameter(
                    f"{FIELD}: embedding '{entry.name}' has vectors of width {'+'.join(map(str, entry.dims))}; this "
                    f"checkpoint's text encoders take {'+'.join(map(str, dims))}", field=FIELD)
        todo = [e for e in entries if not all(_held(tok, enc, e, e.tokens) for tok, enc in pairs)]
        if not todo:
            return
        vectors = [_vectors(e, dims) for e in todo]  # every file validated before anything changes
        for i, (tok, enc) in enumerate(pairs):
            added = tok.get_added_vocab()
            tok.add_tokens([t for e in todo for t in e.tokens if t not in added])
            _widen(tok, enc)  # one resize for all of them
            weight = enc.get_input_embeddings().weight
            for entry, vecs in zip(todo, vectors):
                ids = tok.convert_tokens_to_ids(entry.tokens)
                with torch.no_grad():
                    weight[torch.tensor(ids, device=weight.device)] = vecs[i].to(device=weight.device,
                                                                                 dtype=weight.dtype)
                _LOADED.setdefault(enc, {})[entry.name] = (entry.stamp, tuple(ids))
        for entry in todo:
            log.info("loaded embedding %s (%d vector(s)) into %d text encoder(s)", entry.name, entry.vectors,
                     len(pairs))


def _held(tok: Any, enc: Any, entry: EmbeddingEntry, tokens: list[str]) -> bool:
    held = _LOADED.get(enc, {}).get(entry.name)
    if held is None or held[0] != entry.stamp:
        return False
    vocab = tok.get_added_vocab()
    return tuple(vocab.get(t, -1) for t in tokens) == held[1]


def vector_tokens(tokenizer: Any) -> dict[int, tuple[str, int]]:
    """The embedding tokens `tokenizer` holds (`EmbeddingEntry.tokens`, whoever added them): token id -> (its
    embedding's key, the vector's index). `expand_prompt` writes an embedding as the ids of indices 0..n-1 of
    one key, in that order; prompts.py reads such a run as one embedding, which A1111 never splits across
    chunks. Empty when no embedding was ever loaded."""
    found = {}
    for text, token_id in tokenizer.get_added_vocab().items():
        match = _TOKEN_PARTS.fullmatch(text)
        if match:
            found[token_id] = (match.group(1), int(match.group(2)))
    return found


def loaded_names(pipe: Any) -> list[str]:
    """The embeddings held by `pipe`'s first text encoder (for tests and logs)."""
    pairs = _encoders(pipe)
    return sorted(_LOADED.get(pairs[0][1], {})) if pairs else []


def expand_prompt(pipe: Any, prompt: str, entries: Sequence[EmbeddingEntry]) -> str:
    """`prompt` with every mention of `entries` (matched as `EmbeddingStore.mentioned` matches) replaced by its
    added tokens, all `vectors` of them; what the tokenizer must see. Entries not loaded into `pipe`'s encoders
    stay plain text (logged). Anything spelled like an internal token is broken up first, so only tokens put
    here reach the encoder. Leaves the prompt as it is when `entries` is empty, apart from that."""
    text = _TOKEN_FORM.sub(lambda m: "< " + m.group(0)[1:], prompt) if "<" in prompt else prompt
    if not entries:
        return text
    pairs = _encoders(pipe)
    usable = []
    for entry in entries:
        if pairs and all(_held(tok, enc, entry, entry.tokens) for tok, enc in pairs):
            usable.append(entry)
        else:
            log.warning("embedding %s is not loaded into this pipeline; left as text", entry.name)
    matcher = _Matcher(usable)
    if matcher.regex is None:
        return text
    return matcher.regex.sub(
        lambda m: " " + " ".join(matcher.by_text[_normal(m.group(0))].tokens) + " ", text)
