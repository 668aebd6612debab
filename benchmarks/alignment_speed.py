"""Token alignment: linear-time `refrag.data.alignment.align` against the seed's O(N²) reference DP.

    .venv/bin/python benchmarks/alignment_speed.py [--tokens 2000] [--repeats 5]

Both are measured in the same run on the same ~N-token English text (the MiniLM model card that
ships with the embedded encoder), for the default tokenizer pair (SmolLM2 decoder, MiniLM
encoder) and for SmolLM2 against itself (where the reference finds pairs too, and the two must
agree). Prints the times and the speedup ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import transformers
from transformers import AutoTokenizer

from refrag.data.alignment import align, alignment_pairs_from_dp, compute_dp_matrix
from refrag.io.models import DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens", type=int, default=2000, help="length of the text in decoder tokens"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of the fast path (median)")
    args = parser.parse_args()

    transformers.logging.set_verbosity_error()
    dec_dir, enc_dir = resolve_model(DEFAULT_DECODER), resolve_model(DEFAULT_ENCODER)
    dec, enc = AutoTokenizer.from_pretrained(dec_dir), AutoTokenizer.from_pretrained(enc_dir)
    source = (enc_dir / "README.md").read_text()
    while len(dec(source, add_special_tokens=False)["input_ids"]) < args.tokens:
        source += "\n" + source
    text = dec.decode(dec(source, add_special_tokens=False)["input_ids"][: args.tokens])

    print(f"text: {args.tokens} decoder tokens, {len(text)} characters")
    print(f"{'pair':<22}{'reference DP':>14}{'align()':>12}{'speedup':>10}{'pairs':>8}  agree")
    for name, d, e in (("smollm2 / minilm", dec, enc), ("smollm2 / smollm2", dec, dec)):
        d_ids = d(text, add_special_tokens=False)["input_ids"]
        e_ids = e(text, add_special_tokens=False)["input_ids"]
        t_ref, dp = timed(
            lambda d=d, e=e, d_ids=d_ids, e_ids=e_ids: compute_dp_matrix(
                encoder_ids=e_ids,
                decoder_ids=d_ids,
                encoder_decode_fn=e.decode,
                decoder_decode_fn=d.decode,
            ),
            1,
        )
        t_fast, fast = timed(
            lambda d=d, e=e: align(text, encoder_tokenizer=e, decoder_tokenizer=d), args.repeats
        )
        ref_pairs = alignment_pairs_from_dp(dp)
        agree = (
            "yes"
            if fast.pairs == ref_pairs
            else ("n/a: reference finds none" if not ref_pairs else "NO")
        )
        print(
            f"{name:<22}{t_ref:>13.2f}s{t_fast * 1000:>10.1f}ms{t_ref / t_fast:>9.0f}x{len(fast.pairs):>8}  {agree}"
        )


if __name__ == "__main__":
    main()
