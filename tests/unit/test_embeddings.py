"""Textual-inversion embeddings (pipelines/adapters/embeddings.py): scanning and A1111's listing, finding names in
prompts, loading into the tiny demo pipelines' text encoders, prompt expansion and `TI hashes`.

The demo text encoders are 32 wide (SD 1.5 and SDXL's first) and 64 wide (SDXL's second), so the embedding files
made here have those widths; real-width files (768, 768 + 1280, SD 2.x's 1024) test listing only.
"""

import copy
import hashlib
import logging

import pytest
import torch
from safetensors.torch import save_file

from pipelines.adapters.embeddings import (
    EmbeddingStore,
    encoder_dims,
    ensure_loaded,
    expand_prompt,
    loaded_names,
)
from pipelines.errors import InvalidParameter
from pipelines.hashing import HashCache

SD1 = (32,)
SDXL = (32, 64)


def write(root, name, tensors, metadata=None):
    path = root / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def vec(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def own_tokenizers(pipe):
    """A private copy of the pipeline's tokenizer(s): the demo builder hands out one per process, which these
    tests must not grow."""
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, copy.deepcopy(getattr(pipe, name)))
    return pipe


@pytest.fixture(scope="module")
def sd15():
    from pipelines.builders.demo import build_demo_pipeline

    return own_tokenizers(build_demo_pipeline("demo-sd15"))


@pytest.fixture(scope="module")
def sdxl():
    from pipelines.builders.demo import build_demo_pipeline

    return own_tokenizers(build_demo_pipeline("demo-sdxl"))


@pytest.fixture
def store_at(tmp_path):
    def make(**files):
        for name, tensors in files.items():
            write(tmp_path, name, tensors)
        return EmbeddingStore(tmp_path, HashCache(None))

    return make


# scanning and listing --------------------------------------------------------------------------------------------
def test_scan_reads_layouts_from_headers_and_lists_as_a1111(tmp_path, caplog):
    write(tmp_path, "two", {"emb_params": vec(2, 32)},
          {"step": "1500", "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "demo"})
    write(tmp_path, "flat", {"whatever_key": vec(32)})  # diffusers: one key, one vector of shape [dim]
    write(tmp_path, "a1111", {"string_to_param.*": vec(3, 32), "string_to_token.*": torch.tensor([265])})
    write(tmp_path, "sub/nested", {"emb_params": vec(1, 32)})
    write(tmp_path, "xl", {"clip_l": vec(2, 32), "clip_g": vec(2, 64)})
    write(tmp_path, "real15", {"emb_params": vec(4, 768)})
    write(tmp_path, "realxl", {"clip_l": vec(1, 768), "clip_g": vec(1, 1280)})
    write(tmp_path, "sd2", {"emb_params": vec(1, 1024)})
    write(tmp_path, ".hidden", {"emb_params": vec(1, 32)})
    write(tmp_path, ".cache/inside", {"emb_params": vec(1, 32)})
    write(tmp_path, "lora_by_mistake", {"a.weight": vec(4, 32), "b.weight": vec(32, 4)})
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="pipelines.adapters.embeddings"):
        store = EmbeddingStore(tmp_path, HashCache(None))

    assert {e.name for e in store.entries} == {"two", "flat", "a1111", "nested", "xl", "real15", "realxl", "sd2"}
    assert "lora_by_mistake" in caplog.text and "garbage" in caplog.text
    two = store.get("two")
    assert (two.keys, two.dims, two.vectors, two.shape) == (("emb_params",), SD1, 2, 32)
    assert store.get("a1111").keys == ("string_to_param.*",) and store.get("a1111").vectors == 3
    assert store.get("xl").keys == ("clip_l", "clip_g") and store.get("xl").shape == 96

    body = store.listing(SD1)
    assert sorted(body["loaded"]) == ["a1111", "flat", "nested", "two"]
    assert sorted(body["skipped"]) == ["real15", "realxl", "sd2", "xl"]
    assert body["loaded"]["two"] == {"step": 1500, "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "demo",
                                     "shape": 32, "vectors": 2}
    assert body["loaded"]["flat"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": 32, "vectors": 1}
    assert sorted(store.listing(SDXL)["loaded"]) == ["xl"]

    # No model loaded: what fits an architecture we serve is loaded; SD 2.x and the tiny widths are skipped.
    idle = store.listing()
    assert sorted(idle["loaded"]) == ["real15", "realxl"]
    assert idle["loaded"]["realxl"]["shape"] == 2048 and idle["loaded"]["real15"]["vectors"] == 4
    assert store.get("real15").arch == "sd1" and store.get("realxl").arch == "sdxl" and store.get("sd2").arch is None


def test_pickle_files_are_refused_and_listed_nowhere(tmp_path, caplog):
    write(tmp_path, "good", {"emb_params": vec(1, 32)})
    for name in ("evil.pt", "evil2.bin", "evil3.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with caplog.at_level(logging.WARNING, logger="pipelines.adapters.embeddings"):
        store = EmbeddingStore(tmp_path, HashCache(None))
    body = store.listing(SD1)
    assert list(body["loaded"]) == ["good"] and body["skipped"] == {}
    assert "evil.pt is a pickle file" in caplog.text and "evil2.bin" in caplog.text
    assert store.mentioned(["evil good"], SD1) == [store.get("good")]


def test_refresh_picks_up_new_files(tmp_path):
    store = EmbeddingStore(tmp_path / "embeddings", HashCache(None))
    assert store.listing() == {"loaded": {}, "skipped": {}}
    write(tmp_path / "embeddings", "late", {"emb_params": vec(1, 32)})
    assert store.refresh_if_changed() is True
    assert store.refresh_if_changed() is False
    assert [e.name for e in store.entries] == ["late"]
    (tmp_path / "embeddings" / "late.safetensors").unlink()
    store.refresh()
    assert store.entries == []


# finding names in prompts ------------------------------------------------------------------------------------
def names(store, *texts, dims=SD1):
    return [e.name for e in store.mentioned(list(texts), dims)]


def test_names_match_on_clip_token_boundaries_case_insensitively(store_at):
    one = {"emb_params": vec(1, 32)}
    store = store_at(EasyNegative=one, neg=one, badhandv4=one, **{"bad-hands": one, "bad": one})
    assert names(store, "a cat, EasyNegative") == ["EasyNegative"]
    assert names(store, "(easynegative:1.2)") == ["EasyNegative"]  # CLIP lower-cases, as A1111 sees it
    assert names(store, "negative", "easynegativex", "xeasynegative", "negs") == []  # inside a run of letters
    assert names(store, "neg_v2") == ["neg"]  # `_` is a pre-token of its own for CLIP, as A1111 sees it
    assert names(store, "neg, neg. (neg)") == ["neg"]
    assert names(store, "badhandv45") == ["badhandv4"]  # digits are single tokens: no boundary needed
    assert names(store, "bad-hands") == ["bad-hands"]  # the longest name wins where several start
    assert names(store, "bad hands, bad-hands") == ["bad", "bad-hands"]
    assert names(store, "bad-handsome") == ["bad"]  # `hands` runs on into `handsome`; `bad` ends at `-`
    assert names(store, "neg", "EasyNegative neg") == ["neg", "EasyNegative"]  # first mention order, once each


def test_names_with_regex_specials_and_spaces(store_at):
    one = {"emb_params": vec(1, 32)}
    store = store_at(**{"v1.5 (style)": one, "a+b": one, "my  style": one, "x*": one})
    assert names(store, "photo, v1.5 (style)") == ["v1.5 (style)"]
    assert names(store, "v1x5 (style)", "aab", "ab") == []  # `.` and `+` are literal
    assert names(store, "a+b", "A+B") == ["a+b"]
    assert names(store, "my style", "MY\tSTYLE") == ["my  style"]  # any whitespace inside the name
    assert names(store, "x*") == ["x*"]
    assert names(store, "x**") == []  # `*` runs on into `**`: another pre-token


def test_only_embeddings_that_fit_are_mentioned(store_at):
    store = store_at(small={"emb_params": vec(1, 32)}, xl={"clip_l": vec(1, 32), "clip_g": vec(1, 64)},
                     wide={"emb_params": vec(1, 768)})
    assert names(store, "small xl wide") == ["small"]
    assert names(store, "small xl wide", dims=SDXL) == ["xl"]
    assert names(store, "small xl wide", dims=(768,)) == ["wide"]


# loading into the demo pipelines ---------------------------------------------------------------------------
def token_rows(pipe, prompt, encoder="text_encoder", tokenizer="tokenizer"):
    ids = getattr(pipe, tokenizer)(prompt, return_tensors="pt").input_ids[0]
    with torch.no_grad():
        return ids, getattr(pipe, encoder).get_input_embeddings()(ids)


def test_sd1_vectors_reach_the_token_embeddings_and_change_the_prompt_embeddings(sd15, store_at):
    vectors = vec(1, 32, seed=1)
    store = store_at(mystyle={"emb_params": vectors})
    plain, _ = sd15.encode_prompt("a mystyle cat", "cpu", 1, False)
    entries = store.prepare(sd15, ["a mystyle cat"])
    assert [e.name for e in entries] == ["mystyle"]
    expanded = expand_prompt(sd15, "a mystyle cat", entries)
    assert "mystyle" not in expanded
    ids, rows = token_rows(sd15, expanded)
    cat = sd15.tokenizer("cat", add_special_tokens=False).input_ids
    assert len(ids) == 5 and ids[3].item() == cat[0]  # <start> a <mystyle> cat <end>
    assert torch.equal(rows[2], vectors[0])
    with_embedding, _ = sd15.encode_prompt(expanded, "cpu", 1, False)
    assert with_embedding.shape == plain.shape and not torch.allclose(with_embedding, plain)
    # Positions before the embedding are untouched (causal attention): only the mention changed the rest.
    assert torch.allclose(with_embedding[0, :2], plain[0, :2])


def test_a_name_that_is_an_ordinary_word_still_works(sd15, store_at):
    """diffusers refuses a token already in the vocabulary; A1111 uses the embedding, and so do we."""
    vectors = vec(1, 32, seed=2)
    store = store_at(cat={"emb_params": vectors})
    assert "cat" in sd15.tokenizer.get_vocab()
    entries = store.prepare(sd15, ["a Cat"])
    _, rows = token_rows(sd15, expand_prompt(sd15, "a Cat", entries))
    assert torch.equal(rows[2], vectors[0])
    assert expand_prompt(sd15, "a category", entries) == "a category"


def test_multi_vector_embeddings_expand_to_one_token_per_vector(sd15, store_at):
    from pipelines.generate import _sd1_embeds

    vectors = vec(3, 32, seed=3)
    store = store_at(trio={"string_to_param.*": vectors})
    entries = store.prepare(sd15, ["trio, a house", "blurry"])
    expanded = expand_prompt(sd15, "trio, a house", entries)
    assert expanded.count("<ti-") == 3
    _, rows = token_rows(sd15, expanded)
    assert torch.equal(rows[1:4], vectors)
    # The clip-skip path tokenizes prompts itself: expanded prompts go through it as well.
    embeds = _sd1_embeds(sd15, [expanded, expand_prompt(sd15, "blurry", entries)], 2)
    assert embeds.shape == (2, sd15.tokenizer.model_max_length, 32) and torch.isfinite(embeds).all()


def test_sdxl_embeddings_load_into_both_encoders(sdxl, store_at):
    clip_l, clip_g = vec(2, 32, seed=4), vec(2, 64, seed=5)
    store = store_at(xlstyle={"clip_l": clip_l, "clip_g": clip_g}, sd1only={"emb_params": vec(1, 32)})
    assert encoder_dims(sdxl) == SDXL
    entries = store.prepare(sdxl, ["xlstyle sd1only, a cat"])
    assert [e.name for e in entries] == ["xlstyle"]
    expanded = expand_prompt(sdxl, "xlstyle sd1only, a cat", entries)
    _, rows_l = token_rows(sdxl, expanded)
    ids_g, rows_g = token_rows(sdxl, expanded, "text_encoder_2", "tokenizer_2")
    assert torch.equal(rows_l[1:3], clip_l) and torch.equal(rows_g[1:3], clip_g)
    # The pooled embedding (SDXL's text_embeds) comes from the end-of-text position, not the highest token id.
    with torch.no_grad():
        out = sdxl.text_encoder_2(ids_g[None], output_hidden_states=True)
        eos = (ids_g == sdxl.tokenizer_2.eos_token_id).nonzero()[0].item()
        assert torch.allclose(out.text_embeds[0], sdxl.text_encoder_2.text_projection(out.last_hidden_state[0, eos]))
    prompt_embeds, _, pooled, _ = sdxl.encode_prompt(expanded, device="cpu", do_classifier_free_guidance=False)
    plain, _, plain_pooled, _ = sdxl.encode_prompt("xlstyle sd1only, a cat", device="cpu",
                                                   do_classifier_free_guidance=False)
    assert prompt_embeds.shape == plain.shape and not torch.allclose(prompt_embeds, plain)
    assert pooled.shape == plain_pooled.shape and not torch.allclose(pooled, plain_pooled)


def test_loading_twice_is_a_no_op_and_a_shared_tokenizer_serves_several_encoders(sd15, store_at):
    from pipelines.builders.demo import build_demo_pipeline

    store = store_at(twice={"emb_params": vec(2, 32, seed=6)})
    entries = store.prepare(sd15, ["twice"])
    size, weight = len(sd15.tokenizer), sd15.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    ensure_loaded(sd15, entries)
    store.prepare(sd15, ["twice"])
    assert len(sd15.tokenizer) == size and sd15.text_encoder.get_input_embeddings().weight is weight
    assert torch.equal(weight, before) and "twice" in loaded_names(sd15)

    other = build_demo_pipeline("demo-sd15")  # another checkpoint: its own encoder, the same tokenizer
    other.tokenizer = sd15.tokenizer
    assert "twice" not in loaded_names(other)
    store.prepare(other, ["twice"])
    _, rows = token_rows(other, expand_prompt(other, "twice", entries))
    assert torch.equal(rows[1:3], vec(2, 32, seed=6)) and len(sd15.tokenizer) == size


def test_encoders_grow_to_the_tokenizer_even_without_embeddings(sd15, store_at):
    """Tokens another pipeline added to the shared tokenizer must never index past this encoder's table."""
    from pipelines.builders.demo import build_demo_pipeline

    store_at(grow={"emb_params": vec(1, 32)}).prepare(sd15, ["grow"])
    other = build_demo_pipeline("demo-sd15")
    other.tokenizer = sd15.tokenizer
    ensure_loaded(other, [])
    assert other.text_encoder.get_input_embeddings().num_embeddings >= len(sd15.tokenizer)


def test_a_prompt_cannot_spell_an_internal_token(sd15, store_at):
    entries = store_at(spelled={"emb_params": vec(1, 32)}).prepare(sd15, ["spelled"])
    token = entries[0].tokens[0]
    ids = sd15.tokenizer(expand_prompt(sd15, f"a {token.upper()} b", [])).input_ids
    assert sd15.tokenizer.convert_tokens_to_ids(token) not in ids


def test_a_txt2img_run_with_an_embedding(sd15, store_at):
    entries = store_at(runme={"emb_params": vec(2, 32, seed=7)}).prepare(sd15, ["runme", "ugly"])
    image = sd15(prompt=expand_prompt(sd15, "a runme house", entries), negative_prompt="ugly", num_inference_steps=1,
                 width=64, height=64, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


# long prompts: an embedding is never split across 75-token chunks --------------------------------------------
def test_embedding_runs_are_found_per_mention(sd15, store_at):
    from pipelines.prompts import Run, _weighted_tokens, parse_prompt_attention

    entries = store_at(duo={"emb_params": vec(2, 32)}, solo={"emb_params": vec(1, 32)}).prepare(sd15, ["duo solo"])
    duo, solo = (sd15.tokenizer.convert_tokens_to_ids(e.tokens) for e in entries)
    a, b = (sd15.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("a", "b"))
    expanded = expand_prompt(sd15, "a duo duo (solo:1.5) b", entries)
    tokens = _weighted_tokens(sd15.tokenizer, parse_prompt_attention(expanded))
    assert tokens == [(a, 1.0), Run(((duo[0], 1.0), (duo[1], 1.0))), Run(((duo[0], 1.0), (duo[1], 1.0))),
                      Run(((solo[0], 1.5),)), (b, 1.0)]
    # a vector that does not follow its embedding's vector 0 is an ordinary token
    assert _weighted_tokens(sd15.tokenizer, [(f"a {entries[0].tokens[1]} b", 1.0)]) == [(a, 1.0), (duo[1], 1.0),
                                                                                        (b, 1.0)]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_an_embedding_that_would_straddle_two_chunks_starts_the_second(arch, request, store_at):
    """A1111's tokenize_line: 72 tokens (a comma 12 back) then a 4-vector embedding: the first chunk ends after
    the 72 tokens, padded, and the embedding opens the second, exactly as with a BREAK before it; without the
    rule three vectors would end chunk one and the fourth open chunk two."""
    from pipelines.prompts import CHUNK, chunked_embeds, needs_chunks

    pipe = request.getfixturevalue(arch)
    tensors = ({"emb_params": vec(4, 32, seed=12)} if arch == "sd15"
               else {"clip_l": vec(4, 32, seed=12), "clip_g": vec(4, 64, seed=13)})
    head = "red " * 60 + ", " + "red " * 11  # 72 tokens
    texts = [head + "quad", head + "BREAK quad", "quad"]
    entries = store_at(quad=tensors).prepare(pipe, texts)
    straddling, broken, alone = (expand_prompt(pipe, t, entries) for t in texts)
    assert len(pipe.tokenizer(head, add_special_tokens=False).input_ids) == 72
    # 73 words as written, 76 tokens once the embedding is its 4 vectors: the chunked encoding is used
    assert len(pipe.tokenizer(straddling, add_special_tokens=False).input_ids) == CHUNK + 1
    assert needs_chunks(pipe, [straddling]) and not needs_chunks(pipe, [head + "red"])
    sdxl = arch == "sdxl"
    ours, want = (chunked_embeds(pipe, [p], [""], clip_skip=1, sdxl=sdxl) for p in (straddling, broken))
    for name in ours:
        assert torch.equal(ours[name], want[name]), name
    assert ours["prompt_embeds"].shape[1] == 2 * (CHUNK + 2)
    # the second chunk is the embedding alone, right after its BOS: the encoding of the prompt "quad"
    torch.testing.assert_close(ours["prompt_embeds"][:, CHUNK + 2:],
                               chunked_embeds(pipe, [alone], [""], clip_skip=1, sdxl=sdxl)["prompt_embeds"])


def test_an_embedding_longer_than_a_chunk_is_invalid_parameter(sd15, store_at):
    from pipelines.prompts import CHUNK, chunked_embeds

    store = store_at(whole={"emb_params": vec(CHUNK, 32, seed=14)}, over={"emb_params": vec(CHUNK + 1, 32)})
    entries = store.prepare(sd15, ["whole over"])
    args = chunked_embeds(sd15, [expand_prompt(sd15, "a whole", entries)], [""], clip_skip=1, sdxl=False)
    assert args["prompt_embeds"].shape[1] == 2 * (CHUNK + 2)  # "a", then the 75 vectors in a chunk of their own
    with pytest.raises(InvalidParameter, match="76 vectors") as err:
        chunked_embeds(sd15, [expand_prompt(sd15, "over", entries)], [""], clip_skip=1, sdxl=False)
    assert err.value.field == "prompt"


# errors --------------------------------------------------------------------------------------------------------
def test_an_embedding_that_does_not_fit_is_invalid_parameter(sd15, store_at):
    store = store_at(wide={"emb_params": vec(1, 768)})
    with pytest.raises(InvalidParameter) as err:
        ensure_loaded(sd15, [store.get("wide")])
    assert "'wide'" in err.value.message and err.value.field == "prompt"


def test_a_damaged_or_changed_file_is_invalid_parameter_and_loads_nothing(sd15, tmp_path):
    write(tmp_path, "ok", {"emb_params": vec(1, 32)})
    path = write(tmp_path, "cut", {"emb_params": vec(4, 32)})
    changed = write(tmp_path, "changed", {"emb_params": vec(1, 32)})
    store = EmbeddingStore(tmp_path, HashCache(None))
    path.write_bytes(path.read_bytes()[:-64])  # header intact, data short
    size = len(sd15.tokenizer)
    with pytest.raises(InvalidParameter, match="'cut'"):
        ensure_loaded(sd15, [store.get("ok"), store.get("cut")])
    assert len(sd15.tokenizer) == size and "ok" not in loaded_names(sd15)

    save_file({"emb_params": vec(1, 48)}, str(changed))  # replaced after the scan with another width
    with pytest.raises(InvalidParameter, match="'changed'.*48"):
        ensure_loaded(sd15, [store.get("changed")])
    changed.unlink()
    with pytest.raises(InvalidParameter, match="no longer on the mount"):
        ensure_loaded(sd15, [store.get("changed")])


def test_a_file_rewritten_in_place_is_reloaded_after_a_refresh(sd15, tmp_path):
    write(tmp_path, "evolving", {"emb_params": vec(1, 32, seed=8)})
    store = EmbeddingStore(tmp_path, HashCache(None))
    entries = store.prepare(sd15, ["evolving"])
    write(tmp_path, "evolving", {"emb_params": vec(1, 32, seed=9)})
    store.refresh()
    entries = store.prepare(sd15, ["evolving"])
    _, rows = token_rows(sd15, expand_prompt(sd15, "evolving", entries))
    assert torch.equal(rows[1], vec(1, 32, seed=9)[0])


# infotext --------------------------------------------------------------------------------------------------
def test_ti_hashes_are_the_file_sha256_short(tmp_path):
    a = write(tmp_path, "first", {"emb_params": vec(1, 32)})
    b = write(tmp_path, "odd: name, here", {"emb_params": vec(2, 32)})
    store = EmbeddingStore(tmp_path, HashCache(None))
    entries = store.mentioned(["odd: name, here", "first"], SD1)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (a, b)}
    assert store.ti_hashes(entries) == f"odd name here: {sha[b]}, first: {sha[a]}"
    assert store.ti_hashes([]) is None


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
def test_vectors_take_the_encoders_dtype_and_device(store_at, device):
    from pipelines.builders.demo import build_demo_pipeline

    pipe = own_tokenizers(build_demo_pipeline("demo-sdxl")).to(device=device, dtype=torch.float16)
    clip_l, clip_g = vec(1, 32, seed=10), vec(1, 64, seed=11)
    entries = store_at(half={"clip_l": clip_l, "clip_g": clip_g}).prepare(pipe, ["half"])
    ids = pipe.tokenizer_2(expand_prompt(pipe, "half", entries), return_tensors="pt").input_ids.to(device)
    weight = pipe.text_encoder_2.get_input_embeddings().weight
    assert weight.dtype == torch.float16 and weight.device.type == device
    assert torch.equal(weight[ids[0, 1]].cpu(), clip_g[0].half())
    embeds, _, pooled, _ = pipe.encode_prompt(expand_prompt(pipe, "half", entries), device=device,
                                              do_classifier_free_guidance=False)
    assert embeds.dtype == torch.float16 and torch.isfinite(embeds).all() and torch.isfinite(pooled).all()
