"""Host cost per training batch on CPU: what the GPU would wait for if it ran on the step's
critical path (the default models' real tokenizers; cpt windows at k = 16, s = 256, o = 64).

    PYTHONPATH=. python benchmarks/host_cost.py [--batch 32] [--repeats 50]

Prints milliseconds per batch of:

- ``encode``: building the examples from token ids (:meth:`RefragTokenizer.encode_parts`,
  chunk packing) — done once, when the stage's dataset is built, never per step;
- ``collate``: the stage's collator (:meth:`RefragTokenizer.pad`: Python lists to padded
  tensors) — per step, in DataLoader workers on GPUs (``dataloader_num_workers``);
- ``stack``: stacking tensors that were ready in the dataset (what benchmarks/gpu_check.py
  does), the floor of a collator;
- ``pin+copy``: pinning the batch (the workers' pinned memory) — on CPU only the pinning.

A host cost per batch well under the GPU's step time (tens of ms at batch 32 on an H100)
stays off the critical path once it runs in workers, a few batches ahead.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from refrag.io.models import DEFAULT_DECODER, DEFAULT_ENCODER, resolve_model
from refrag.modeling.tokenization import RefragTokenizer


def per_batch_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pair = {
        "encoder_name_or_path": str(resolve_model(DEFAULT_ENCODER)),
        "decoder_name_or_path": str(resolve_model(DEFAULT_DECODER)),
    }
    tok = RefragTokenizer.from_encoder_decoder_pretrained(**pair, compression=args.k)
    rng = random.Random(0)
    windows = [
        (
            [rng.randrange(1000, 20000) for _ in range(256)],
            [rng.randrange(100, 40000) for _ in range(64)],
        )
        for _ in range(args.batch)
    ]

    def encode():
        return [tok.encode_parts([("chunks", ctx), ("text", tgt)]) for ctx, tgt in windows]

    examples = encode()
    batch = tok.pad(examples)
    tensors = [
        {name: value[i] for name, value in batch.items() if value.shape[0] == args.batch}
        for i in range(args.batch)
    ]

    def stack():
        return {name: torch.stack([t[name] for t in tensors]) for name in tensors[0]}

    def pin():
        return {
            name: value.pin_memory() if torch.cuda.is_available() else value.clone()
            for name, value in batch.items()
        }

    timings = {
        "encode": per_batch_ms(encode, args.repeats),
        "collate": per_batch_ms(lambda: tok.pad(examples), args.repeats),
        "stack": per_batch_ms(stack, args.repeats),
        "pin+copy": per_batch_ms(pin, args.repeats),
    }
    shape = {name: tuple(value.shape) for name, value in batch.items()}
    print(f"batch {args.batch}, k={args.k}: {shape}")
    for name, ms in timings.items():
        print(f"  {name:<9} {ms:8.2f} ms per batch")


if __name__ == "__main__":
    main()
