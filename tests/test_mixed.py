import math

import pytest

from refrag.data.mixed import document_positions, expanded_parts
from refrag.modeling.tokenization import RefragTokenizer

PASSAGE = "The Analytical Engine was designed by Charles Babbage in 1837, in London."
TEXT = f"Read this: <doc id='a'>{PASSAGE}</doc>\nWho designed it?"


@pytest.fixture(params=["other encoder", "shared tokenizer"])
def tok(request, refrag_tokenizer, decoder_tokenizer) -> RefragTokenizer:
    """The uncased MiniLM encoder beside the SmolLM2 decoder, or the decoder's own tokenizer
    as the encoder's."""
    if request.param == "other encoder":
        return refrag_tokenizer
    return RefragTokenizer(
        encoder_tokenizer=decoder_tokenizer, decoder_tokenizer=decoder_tokenizer, compression=4
    )


def chunk_texts(tok: RefragTokenizer, text: str) -> list[str]:
    """Each chunk's text, cut at its encoder tokens' character ends."""
    enc = tok.encoder_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in enc["offset_mapping"]]
    starts = [0] + [ends[i - 1] for i in range(tok.compression, len(ends), tok.compression)]
    stops = [
        ends[min(i + tok.compression, len(ends)) - 1] for i in range(0, len(ends), tok.compression)
    ]
    return [text[a:b] for a, b in zip(starts, stops)]


def test_no_expansion_is_the_refrag_encoding(tok):
    assert tok.encode_parts(expanded_parts(tok, TEXT, [[]])) == tok.encode(TEXT)


def test_expanded_chunks_are_decoder_tokens_of_their_text_and_the_rest_placeholders(tok):
    pieces = chunk_texts(tok, PASSAGE)
    assert "".join(pieces) == PASSAGE  # the cased text, whatever the encoder's case
    expand = [0, 2, len(pieces) - 1]
    parts = expanded_parts(tok, TEXT, [expand])
    example = tok.encode_parts(parts)
    plain = tok.encode(TEXT)
    dec = tok.decoder_tokenizer
    expanded = [dec(pieces[i], add_special_tokens=False)["input_ids"] for i in expand]
    assert [ids for kind, ids in parts if kind == "prompt"] == expanded
    compressed = len(pieces) - len(expand)
    assert sum(example["chunk_mask"]) == compressed
    kept = [row for i, row in enumerate(plain["chunk_rows"]) if i not in expand]
    assert example["chunk_rows"] == kept  # compressed chunks are the same encoder rows
    positions = sum(map(len, expanded)) + compressed
    assert document_positions(parts, tok.compression) == positions
    outside = len(plain["input_ids"]) - len(pieces)  # BOS and the text around the doc
    assert len(example["input_ids"]) == outside + positions
    text = dec.decode([i for i, c in zip(example["input_ids"], example["chunk_mask"]) if not c])
    assert pieces[0] in text and pieces[2] in text and pieces[1] not in text


def test_full_expansion_reads_the_passage_as_tokens(tok):
    n = math.ceil(len(tok.parse_and_tokenize(TEXT)[1].tokens) / tok.compression)
    example = tok.encode_parts(expanded_parts(tok, TEXT, [range(n)]))
    assert not any(example["chunk_mask"]) and example["chunk_rows"] == []
    assert PASSAGE in tok.decoder_tokenizer.decode(example["input_ids"])


def test_each_document_takes_its_own_selection(refrag_tokenizer):
    tok = refrag_tokenizer
    text = f"<doc id='a'>{PASSAGE}</doc> and <doc id='b'>{PASSAGE}</doc>"
    first, second = (tok.encode_parts(expanded_parts(tok, text, s)) for s in ([[0], []], [[], [0]]))
    assert sum(first["chunk_mask"]) == sum(second["chunk_mask"])
    assert first["input_ids"] != second["input_ids"]
    with pytest.raises(ValueError, match="1 selections for 2 documents"):
        expanded_parts(tok, text, [[0]])
