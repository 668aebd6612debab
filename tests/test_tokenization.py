from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refrag.modeling.tokenization import (
    IGNORE_INDEX,
    DocMarkupError,
    DuplicateDocIdError,
    EmptyDocumentWarning,
    InvalidTextError,
    MalformedDocTagError,
    MissingDocIdError,
    NestedDocError,
    RefragTokenizer,
    StrayCloseTagError,
    TextTooLargeError,
    TextTypeError,
    UnclosedDocError,
    parse_segments,
)


def test_segments_alternate_decoder_and_documents_in_order():
    segs = parse_segments("Q: <doc id=\"a\">alpha</doc> mid <doc id='b'>beta</doc> end")
    assert [s["type"] for s in segs] == ["decoder", "encoder", "decoder", "encoder", "decoder"]
    assert [s["raw_text"] for s in segs] == ["Q: ", "alpha", " mid ", "beta", " end"]
    assert [s["meta"]["id"] for s in segs if s["type"] == "encoder"] == ["a", "b"]


def test_whitespace_between_documents_is_kept():
    text = '<doc id="1">x</doc>\n \t<doc id="2">y</doc>'
    assert [s.raw_text for s in parse_segments(text)] == ["x", "\n \t", "y"]


@pytest.mark.parametrize(
    ("text", "error", "position"),
    [
        ('intro <doc id="1">never closed', UnclosedDocError, 6),
        ('<doc id="1">a <doc id="2">b</doc></doc>', NestedDocError, 14),
        ("text </doc> more", StrayCloseTagError, 5),
        ("<doc>no id</doc>", MissingDocIdError, 0),
        ('ab <doc id="">empty id</doc>', MissingDocIdError, 3),
        ('<doc id="x">a</doc><doc id="x">b</doc>', DuplicateDocIdError, 19),
        ("<doc id=1>unquoted</doc>", MalformedDocTagError, 0),
        ('<doc id="1">a</doc x>', MalformedDocTagError, 13),
    ],
)
def test_bad_markup_raises_typed_error_naming_the_position(text, error, position):
    with pytest.raises(error) as info:
        parse_segments(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DocMarkupError)
    assert info.value.position == position
    assert f"position {position}" in str(info.value)


def test_words_that_start_like_doc_are_plain_text():
    segs = parse_segments("a <document> and <docs> are text")
    assert [s.type for s in segs] == ["decoder"]


def test_extra_attributes_are_kept_in_meta():
    (seg,) = parse_segments("<doc id='7' source=\"wiki\">t</doc>")
    assert seg.meta == {"id": "7", "source": "wiki"}


tag_text = st.text(  # valid Unicode (lone surrogates are refused, see below)
    alphabet=st.characters(codec="utf-8", blacklist_characters="<>"), max_size=30
)


@given(st.lists(st.tuples(tag_text, tag_text), max_size=5), tag_text, st.sampled_from(["'", '"']))
def test_joined_raw_texts_give_the_input_without_tags(parts, tail, quote):
    text = (
        "".join(
            f"{pre}<doc id={quote}d{i}{quote}>{body}</doc>" for i, (pre, body) in enumerate(parts)
        )
        + tail
    )
    expected = "".join(pre + body for pre, body in parts) + tail
    segs = parse_segments(text)
    assert "".join(s.raw_text for s in segs) == expected
    assert all(text[s.start : s.start + len(s.raw_text)] == s.raw_text for s in segs)


def test_documents_are_packed_into_rows_of_k_with_a_mask(refrag_tokenizer, encoder_tokenizer):
    doc = "one two three four five six seven eight nine ten eleven"
    segs = refrag_tokenizer.parse_and_tokenize(f"Q <doc id='d'>{doc}</doc>")
    enc = segs[1]
    ids = encoder_tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert enc.tokens == ids
    assert all(len(row) == 4 for row in enc.packed_tokens)
    assert [
        t
        for row, m in zip(enc.packed_tokens, enc.attention_mask)
        for t, keep in zip(row, m)
        if keep
    ] == ids
    assert enc.num_chunks == -(-len(ids) // 4)
    assert sum(enc.attention_mask[-1]) == len(ids) - 4 * (enc.num_chunks - 1)


def test_an_empty_document_adds_no_chunk_with_a_warning_naming_it(refrag_tokenizer):
    for body in ("", "   "):
        with pytest.warns(EmptyDocumentWarning, match="document 'e' at position 19 is empty"):
            batch = refrag_tokenizer(f"before <doc id='e'>{body}</doc> after")
        assert int(batch["chunk_mask"].sum()) == 0 and batch["chunk_input_ids"].shape[0] == 0
        assert refrag_tokenizer.decode(batch["input_ids"][0]).endswith("before  after")
    with pytest.warns(EmptyDocumentWarning):
        batch = refrag_tokenizer("<doc id='e'></doc><doc id='f'>Ada Lovelace</doc> Q")
    assert int(batch["chunk_mask"].sum()) == 1


def test_decoder_segments_carry_no_special_tokens(refrag_tokenizer, decoder_tokenizer):
    (seg,) = refrag_tokenizer.parse_and_tokenize("Hello there")
    assert seg.tokens == decoder_tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    assert decoder_tokenizer.bos_token_id not in seg.tokens


def test_default_special_tokens_are_explicit(
    refrag_tokenizer, decoder_tokenizer, encoder_tokenizer
):
    """SmolLM2: BOS <|im_start|> (id 1) starts the decoder sequence; MiniLM: chunk rows are
    [CLS] … [SEP] padded to k + 2."""
    batch = refrag_tokenizer("Hi <doc id='d'>some words in a doc</doc>")
    assert batch["input_ids"][0, 0].item() == decoder_tokenizer.bos_token_id == 1
    assert encoder_tokenizer.cls_token_id == 101 and encoder_tokenizer.sep_token_id == 102
    rows, mask = batch["chunk_input_ids"], batch["chunk_attention_mask"]
    assert rows.shape[1] == refrag_tokenizer.chunk_width == 6
    assert (rows[:, 0] == 101).all()
    last = mask.sum(1) - 1
    assert (rows[torch.arange(len(rows)), last] == 102).all()
    no_bos = RefragTokenizer(
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        compression=4,
        add_bos=False,
        encoder_special_tokens=False,
    )
    batch = no_bos("Hi <doc id='d'>some words in a doc</doc>")
    assert batch["input_ids"][0, 0].item() != 1 and batch["chunk_input_ids"].shape[1] == 4


def test_batch_places_one_chunk_position_per_row_in_order(refrag_tokenizer):
    texts = [
        "short <doc id='a'>a b c d e f g h i</doc> q",
        "longer prompt here <doc id='b'>x</doc>",
    ]
    batch = refrag_tokenizer(texts)
    per_text = [sum(s.num_chunks for s in refrag_tokenizer.parse_and_tokenize(t)) for t in texts]
    assert batch["chunk_mask"].sum(1).tolist() == per_text
    assert batch["chunk_input_ids"].shape[0] == sum(per_text)
    assert (batch["labels"][batch["chunk_mask"]] == IGNORE_INDEX).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["chunk_mask"].shape


def test_left_padding_puts_padding_first(refrag_tokenizer):
    batch = refrag_tokenizer(["a", "a much longer text than the first"], padding_side="left")
    assert batch["attention_mask"][0, -1] == 1 and batch["attention_mask"][0, 0] == 0


def test_save_and_load_round_trip(tmp_path, refrag_tokenizer):
    refrag_tokenizer.save_pretrained(tmp_path)
    again = RefragTokenizer.from_pretrained(tmp_path)
    text = "Q <doc id='1'>Paris is the capital of France.</doc> A:"
    assert again.compression == 4
    for key, value in refrag_tokenizer(text).items():
        assert torch.equal(value, again(text)[key])


def test_pair_loader_takes_model_specs(encoder_dir, decoder_dir):
    tok = RefragTokenizer.from_encoder_decoder_pretrained(
        encoder_name_or_path="embedded:all-minilm-l6-v2",
        decoder_name_or_path=str(decoder_dir),
        compression=8,
    )
    assert tok.compression == 8 and tok.decoder_tokenizer.vocab_size == 49152
    assert Path(tok.encoder_tokenizer.name_or_path).resolve() == encoder_dir.resolve()


def test_pair_loader_takes_folders_holding_only_tokenizer_files(
    tmp_path, encoder_tokenizer, decoder_tokenizer
):
    encoder_tokenizer.save_pretrained(tmp_path / "enc")
    decoder_tokenizer.save_pretrained(tmp_path / "dec")
    assert not (tmp_path / "enc" / "config.json").exists()
    tok = RefragTokenizer.from_encoder_decoder_pretrained(
        encoder_name_or_path=tmp_path / "enc", decoder_name_or_path=tmp_path / "dec"
    )
    assert tok.encoder_tokenizer.get_vocab() == encoder_tokenizer.get_vocab()
    assert tok.decoder_tokenizer.get_vocab() == decoder_tokenizer.get_vocab()


def test_encoder_and_decoder_must_be_named(encoder_tokenizer, decoder_tokenizer):
    with pytest.raises(TypeError):
        RefragTokenizer(encoder_tokenizer, decoder_tokenizer)  # a swap could pass silently


# -- input validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [b"<doc id='a'>x</doc>", bytearray(b"hi"), None, 5, ["a"]])
def test_non_str_input_is_a_typed_error(refrag_tokenizer, value):
    with pytest.raises(TextTypeError, match="expected str"):
        refrag_tokenizer(value) if isinstance(value, (bytes, bytearray)) else parse_segments(value)


def test_bytes_input_says_to_decode_it(refrag_tokenizer):
    with pytest.raises(TextTypeError, match=r"got bytes: decode it first"):
        refrag_tokenizer.parse_and_tokenize(b"text")


@given(st.text(max_size=40), st.integers(min_value=0), st.integers(0xD800, 0xDFFF))
def test_a_lone_surrogate_anywhere_is_a_typed_error_naming_its_position(text, at, code):
    at = at % (len(text) + 1)
    bad = text[:at] + chr(code) + text[at:]
    with pytest.raises(InvalidTextError, match=f"U\\+{code:04X}") as err:
        parse_segments(bad)
    assert err.value.position == at


def test_size_caps_refuse_huge_texts_before_and_after_tokenizing(
    encoder_tokenizer, decoder_tokenizer
):
    capped = RefragTokenizer(
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        compression=4,
        max_text_chars=100,
        max_chunk_rows=3,
    )
    with pytest.raises(TextTooLargeError, match="max_text_chars"):
        capped("x" * 101)
    with pytest.raises(TextTooLargeError, match="max_chunk_rows"):
        capped(
            "<doc id='a'>one two three four five six seven eight nine ten eleven twelve thirteen</doc>"
        )
    assert capped("<doc id='a'>one two three</doc>")["chunk_input_ids"].shape[0] == 1
    uncapped = RefragTokenizer(
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
        compression=4,
        max_text_chars=None,
        max_chunk_rows=None,
    )
    assert uncapped("<doc id='a'>" + "word " * 200 + "</doc>")["chunk_input_ids"].shape[0] == 50


def test_special_token_strings_in_a_document_are_plain_text(refrag_tokenizer, encoder_tokenizer):
    (seg,) = refrag_tokenizer.parse_and_tokenize("<doc id='a'>x [SEP] [CLS] y</doc>")
    special = {encoder_tokenizer.sep_token_id, encoder_tokenizer.cls_token_id}
    assert not special & set(seg.tokens)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(min_size=1, max_size=200).filter(str.strip))
def test_any_escaped_file_text_is_exactly_one_document(refrag_tokenizer, body):
    from refrag.modeling.prompting import escape_doc_text

    escaped, _ = escape_doc_text(body)
    segments = parse_segments(f"Q <doc id='f'>{escaped}</doc> A")
    assert [s.type for s in segments] == ["decoder", "encoder", "decoder"]
    assert segments[1].raw_text == escaped and segments[2].raw_text == " A"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(st.characters(codec="utf-8", exclude_characters="<"), min_size=1, max_size=300))
@pytest.mark.filterwarnings("ignore::refrag.modeling.tokenization.EmptyDocumentWarning")
def test_any_document_packs_into_full_rows_of_k_with_one_chunk_position_each(
    refrag_tokenizer, body
):
    k = refrag_tokenizer.compression
    (seg,) = refrag_tokenizer.parse_and_tokenize(f"<doc id='d'>{body}</doc>")
    if not seg.tokens:
        assert refrag_tokenizer.encoder_tokenizer(body, add_special_tokens=False)["input_ids"] == []
        return
    assert seg.num_chunks == -(-len(seg.tokens) // k)
    assert [
        t
        for row, m in zip(seg.packed_tokens, seg.attention_mask)
        for t, keep in zip(row, m)
        if keep
    ] == seg.tokens
    batch = refrag_tokenizer(f"<doc id='d'>{body}</doc>")
    assert int(batch["chunk_mask"].sum()) == seg.num_chunks == batch["chunk_input_ids"].shape[0]
    assert batch["chunk_input_ids"].shape[1] == refrag_tokenizer.chunk_width
