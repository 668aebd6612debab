import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from refrag.data.alignment import (
    align,
    alignment_pairs_from_dp,
    compute_dp_matrix,
    compute_prefix_strings,
    token_boundaries,
)

# Text with whitespace runs, accents, CJK and emoji (no U+FFFD: it marks broken characters).
ALPHABET = st.one_of(
    st.sampled_from(list(" \t\n  ")),
    st.sampled_from(list("abcdefXYZ.,;!?'-0123456789")),
    st.sampled_from(list("éèüñçÅßøœ")),
    st.sampled_from(list("東京大学日本語中文")),
    st.sampled_from(["😀", "🚀", "👍🏽", "🇫🇷", "∑", "€"]),
)
texts = st.lists(ALPHABET, min_size=1, max_size=40).map("".join)
slow_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def reference_pairs(text, dec_tok, enc_tok):
    """The seed's O(N²) definition, without matches inside a broken multi-byte character."""
    dec = dec_tok(text, add_special_tokens=False)["input_ids"]
    enc = enc_tok(text, add_special_tokens=False)["input_ids"]
    dp = compute_dp_matrix(
        encoder_ids=enc,
        decoder_ids=dec,
        encoder_decode_fn=enc_tok.decode,
        decoder_decode_fn=dec_tok.decode,
    )
    prefixes = compute_prefix_strings(dec_tok.decode, dec)
    return [(c, r) for c, r in alignment_pairs_from_dp(dp) if "\ufffd" not in prefixes[c]]


def reproduces(tok, text):
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_reference_api_on_a_small_example():
    decode = lambda seq: "".join("ab"[i - 1] for i in seq)  # noqa: E731
    assert compute_prefix_strings(decode, [1, 2]) == ["", "a", "ab"]
    dp = compute_dp_matrix(
        encoder_ids=[1, 2], decoder_ids=[1, 2], encoder_decode_fn=decode, decoder_decode_fn=decode
    )
    assert dp.shape == (3, 3)
    assert dp[0, 0]  # the empty prefixes match, but pairs are prefix lengths >= 1
    assert alignment_pairs_from_dp(dp) == [(1, 1), (2, 2)]


@pytest.mark.parametrize("pair", ["smollm2-llama", "llama-smollm2", "smollm2-smollm2"])
@slow_settings
@given(text=texts)
def test_align_equals_reference_for_reproducing_tokenizers(pair, text, request):
    toks = {
        "smollm2": request.getfixturevalue("decoder_tokenizer"),
        "llama": request.getfixturevalue("llama_style_tokenizer"),
    }
    dec_tok, enc_tok = (toks[name] for name in pair.split("-"))
    assume(reproduces(dec_tok, text) and reproduces(enc_tok, text))
    result = align(text, encoder_tokenizer=enc_tok, decoder_tokenizer=dec_tok)
    assert result.pairs == reference_pairs(text, dec_tok, enc_tok)
    assert result.decoder_ids == dec_tok(text, add_special_tokens=False)["input_ids"]
    assert result.encoder_ids == enc_tok(text, add_special_tokens=False)["input_ids"]


def test_reference_finds_nothing_for_the_uncased_encoder_but_align_does(
    decoder_tokenizer, encoder_tokenizer
):
    text = "Hello World from Paris"
    assert reference_pairs(text, decoder_tokenizer, encoder_tokenizer) == []
    result = align(text, encoder_tokenizer=encoder_tokenizer, decoder_tokenizer=decoder_tokenizer)
    # SmolLM2: Hello| World| from| Paris ; MiniLM: hello|world|from|paris
    assert result.pairs == [(1, 1), (2, 2), (3, 3), (4, 4)]


@slow_settings
@given(text=texts)
def test_uncased_encoder_pairs_sit_on_shared_token_ends(text, decoder_tokenizer, encoder_tokenizer):
    """Offsets contract: (c, r) is a pair iff both tokenizations end a token at the same
    character; each pair's decoder prefix decodes to a prefix of the text whose own encoder
    tokenization is the first r encoder tokens."""
    result = align(text, encoder_tokenizer=encoder_tokenizer, decoder_tokenizer=decoder_tokenizer)
    dec_ends = token_boundaries(decoder_tokenizer, text)[1]
    enc_ends = token_boundaries(encoder_tokenizer, text)[1]
    expected = [
        (c, r)
        for c, a in enumerate(dec_ends, 1)
        for r, b in enumerate(enc_ends, 1)
        if a is not None and a == b
    ]
    assert result.pairs == expected
    for c, r in result.pairs:
        prefix = decoder_tokenizer.decode(result.decoder_ids[:c])
        assert text.startswith(prefix)
        assert (
            encoder_tokenizer(prefix, add_special_tokens=False)["input_ids"]
            == result.encoder_ids[:r]
        )


def test_pairs_are_sorted_and_one_based(decoder_tokenizer, encoder_tokenizer):
    result = align(
        "Ünïcode — 東京 😀 text, again.",
        encoder_tokenizer=encoder_tokenizer,
        decoder_tokenizer=decoder_tokenizer,
    )
    assert result.pairs == sorted(result.pairs)
    assert all(c >= 1 and r >= 1 for c, r in result.pairs)
    dec_idx, enc_idx = result.token_indices()
    assert list(zip(dec_idx + 1, enc_idx + 1)) == result.pairs


def test_split_emoji_boundaries_are_not_pairs(decoder_tokenizer):
    ids, ends = token_boundaries(decoder_tokenizer, "a😀b")
    assert decoder_tokenizer.decode(ids) == "a😀b"
    for n, end in enumerate(ends, 1):
        assert (end is None) == ("\ufffd" in decoder_tokenizer.decode(ids[:n]))


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast tokenizer"):
        align("x", encoder_tokenizer=Slow(), decoder_tokenizer=Slow())
