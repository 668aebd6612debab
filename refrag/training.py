"""Training stages of a REFRAG model, on the Hugging Face Trainer.

The stages themselves (names, order, data, defaults) are the table in :mod:`refrag.stages`;
this module holds what they are made of (dataset builders, losses, trainers) and the one loop
that runs any of them, :func:`train_stage`. The built-in stages:

- ``align`` (the seed's alignment app; "the seed" is the Hydra repository this project grew
  from): a span of encoder tokens that decodes to one decoder token (:mod:`refrag.alignment`)
  is read as a chunk, and its projected CLS state learns to become that token's embedding,
  with MSE, KL and argmax (cross-entropy) losses over all pairs of a batch at once.
- ``reconstruct`` (paper stage 1): decoder frozen; encoder + projector learn to reproduce the
  context's tokens from its chunk embeddings, with a mixed-length curriculum from 1 chunk up
  to the whole context.
- ``cpt`` (paper stage 2, continual pretraining): read the context as chunk embeddings and
  predict the next tokens (next-paragraph prediction), decoder trained; ``cpt_frozen`` is its
  frozen-decoder ablation.
- ``sft`` (paper stage 3) lives in :mod:`refrag.sft`; ``mixed`` (continual pretraining on
  inputs with a random fraction of chunks as tokens) and ``policy`` (REINFORCE on the
  chunk-selection policy) in :mod:`refrag.selective`.

Each stage writes a Hugging Face folder (model, tokenizer, ``training_log.json``) atomically;
Trainer checkpoints live beside it in ``<out>.work/`` and a rerun resumes from the newest
complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainingArguments

from refrag.data import read_alignment_cache, read_shards
from refrag.heldout import HeldOutCurve
from refrag.integrity import one_line_errors, verify_folder, write_manifest
from refrag.modeling import RefragModel
from refrag.preflight import check_compression
from refrag.resume import SealCheckpoints, last_complete_checkpoint, resumed_train_loss
from refrag.stages import STAGES, StageConfig, get_stage
from refrag.tokenization import RefragTokenizer
from refrag.utils import atomic_folder


class ExampleDataset(Dataset):
    """A list of :meth:`RefragTokenizer.encode_parts` outputs."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def shuffled_cycle(n: int, total: int, seed: int) -> list[int]:
    """``total`` indices into ``range(n)``: every item once per pass, each pass in a fresh
    seeded random order (so a stage reads all windows, not the first ``total`` in document
    order)."""
    rng = np.random.default_rng(seed)
    passes = -(-total // n) if n else 0
    return [int(i) for _ in range(passes) for i in rng.permutation(n)][:total]


def curriculum_lengths(curriculum: list[int], total: int, seed: int) -> list[int]:
    """Chunk counts of ``total`` reconstruction examples, in training order.

    Training runs in ``len(curriculum)`` equal phases; phase ``p`` draws each example's chunk
    count uniformly from ``curriculum[: p + 1]``, so lengths mix (short ones keep coming) while
    the longest grows to ``curriculum[-1]``, as in the paper's curriculum (its Table 8)."""
    rng = np.random.default_rng(seed)
    phases = len(curriculum)
    return [int(rng.choice(curriculum[: i * phases // total + 1])) for i in range(total)]


def reconstruction_examples(
    windows: pd.DataFrame, tok: RefragTokenizer, curriculum: list[int], total: int, seed: int = 0
) -> list[dict]:
    """``total`` examples in curriculum order (:func:`curriculum_lengths`): an example reads
    ``n`` chunks of a context (all its chunks where it has fewer) and must reproduce the text
    they cover, as decoder tokens. Contexts come from all windows, in a seeded random order."""
    k = tok.compression
    rows = windows.to_dict("records")
    examples = []
    lengths = curriculum_lengths(curriculum, total, seed)
    for n_chunks, r in zip(lengths, shuffled_cycle(len(rows), total, seed)):
        row = rows[r]
        enc_ids = list(row["context_encoder_ids"])
        n = min(n_chunks * k, len(enc_ids))
        if n == 0:
            continue
        text = row["context_text"][: row["context_encoder_ends"][n - 1]]
        target = tok.decoder_tokenizer(text, add_special_tokens=False)["input_ids"]
        examples.append(tok.encode_parts([("chunks", enc_ids[:n]), ("text", target)]))
    return examples


def continuation_examples(
    windows: pd.DataFrame, tok: RefragTokenizer, target_tokens: int | None = None
) -> list[dict]:
    """Context as chunk embeddings, then the target tokens (labelled): all of them, or the
    first ``target_tokens``."""
    return [
        tok.encode_parts(
            [
                ("chunks", list(row["context_encoder_ids"])),
                ("text", list(row["target_ids"][:target_tokens])),
            ]
        )
        for row in windows.to_dict("records")
    ]


class RefragTrainer(Trainer):
    """Trainer on the model's causal-LM loss; ``sequential`` keeps curriculum order.

    The loss is the Trainer's own: it passes ``num_items_in_batch`` (target tokens in the whole
    accumulated batch) to the model, so gradient accumulation averages over tokens instead of
    multiplying the loss by the accumulation steps."""

    def __init__(self, *args, sequential: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequential = sequential

    def _get_train_sampler(self, train_dataset=None):
        if self.sequential:
            return SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )
        return super()._get_train_sampler(train_dataset)


class AlignmentTrainer(Trainer):
    """The seed's alignment losses between projected chunk embeddings and decoder embeddings."""

    def __init__(self, *args, loss_weights: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses = alignment_losses(model, **inputs)
        loss = sum(self.loss_weights[name] * value for name, value in losses.items())
        if self.state.global_step % max(1, self.args.logging_steps) == 0 and model.training:
            self.log({f"align_{name}": value.item() for name, value in losses.items()})
        return (loss, losses) if return_outputs else loss


def alignment_losses(
    model: RefragModel,
    chunk_input_ids: torch.Tensor,
    chunk_attention_mask: torch.Tensor,
    pair_decoder_ids: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """MSE, KL and argmax losses of all aligned pairs of the batch in one pass.

    Each pair is a span of encoder tokens that decodes to exactly one decoder token. The span
    is read as one chunk, the way the model reads context (CLS state, projected), and that
    chunk embedding should equal the decoder's embedding of the token; compared through the
    (detached) embedding matrix, its similarity profile over the vocabulary should match the
    token's (KL) and pick the token itself (argmax). ``model`` may be DDP-wrapped: the chunk
    embeddings come from its ``forward`` so that gradients are synchronised.
    """
    projected = model(
        chunk_input_ids=chunk_input_ids,
        chunk_attention_mask=chunk_attention_mask,
        chunk_embeds_only=True,
    ).chunk_embeds
    table = getattr(model, "module", model).get_input_embeddings().weight.detach()
    table = table.to(projected.dtype)
    target = table[pair_decoder_ids]
    logits = projected @ table.T
    target_logits = target @ table.T
    return {
        "mse": F.mse_loss(projected, target),
        "kld": F.kl_div(
            F.log_softmax(logits, -1),
            F.log_softmax(target_logits, -1),
            log_target=True,
            reduction="batchmean",
        ),
        "argmax": F.cross_entropy(logits, pair_decoder_ids),
    }


def aligned_spans(row: dict, max_encoder_tokens: int) -> list[tuple[list[int], int]]:
    """(encoder span, decoder token) of one alignment-cache row: the encoder tokens between two
    consecutive aligned prefixes, where they cover exactly one decoder token and at most
    ``max_encoder_tokens`` encoder tokens."""
    spans, d_prev, e_prev = [], -1, -1
    for d, e in zip(row["decoder_index"], row["encoder_index"]):
        if d - d_prev == 1 and 0 < e - e_prev <= max_encoder_tokens:
            spans.append((list(row["encoder_ids"][e_prev + 1 : e + 1]), int(row["decoder_ids"][d])))
        d_prev, e_prev = d, e
    return spans


class AlignmentCollator:
    """Alignment-cache rows → one chunk row per aligned span (at most ``max_pairs``, an even
    random subset) and the decoder token each should become."""

    def __init__(self, tok: RefragTokenizer, max_pairs: int | None = None, seed: int = 0):
        self.tok, self.max_pairs = tok, max_pairs
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [p for row in rows for p in aligned_spans(row, self.tok.compression)]
        if self.max_pairs is not None and len(pairs) > self.max_pairs:
            keep = torch.randperm(len(pairs), generator=self.rng)[: self.max_pairs].sort().values
            pairs = [pairs[i] for i in keep.tolist()]
        chunks = self.tok.pad([self.tok.encode_parts([("chunks", span)]) for span, _ in pairs])
        return {
            "chunk_input_ids": chunks["chunk_input_ids"],
            "chunk_attention_mask": chunks["chunk_attention_mask"],
            "pair_decoder_ids": torch.tensor([token for _, token in pairs], dtype=torch.long),
        }


# -- what the stages in refrag.stages are made of: (data, tok, hp) -> (dataset, collator) ------
def _total(hp: StageConfig) -> int:
    return hp.steps * hp.batch_size * hp.grad_accum


def alignment_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, AlignmentCollator]:
    """Rows of the alignment-pair cache, all of them in a random order, cycled to fill every
    step."""
    rows = read_alignment_cache(data).to_dict("records")
    dataset = ExampleDataset([rows[i] for i in shuffled_cycle(len(rows), _total(hp), hp.seed)])
    return dataset, AlignmentCollator(tok, max_pairs=hp.max_pairs, seed=hp.seed)


def reconstruction_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, object]:
    """Reconstruction examples of the train shards, in curriculum order."""
    examples = reconstruction_examples(
        read_shards(data), tok, hp.curriculum, _total(hp), seed=hp.seed
    )
    return ExampleDataset(examples), tok.pad


def continuation_dataset(
    data: str | os.PathLike, tok: RefragTokenizer, hp: StageConfig
) -> tuple[Dataset, object]:
    """Continuation examples of all train windows in a random order, cycled to fill every
    step."""
    base = continuation_examples(read_shards(data), tok, hp.target_tokens or None)
    order = shuffled_cycle(len(base), _total(hp), hp.seed)
    return ExampleDataset([base[i] for i in order]), tok.pad


# -- (hp, **Trainer kwargs) -> Trainer --------------------------------------------------------
def alignment_trainer(hp: StageConfig, **kwargs) -> AlignmentTrainer:
    return AlignmentTrainer(**kwargs, loss_weights=hp.loss_weights)


def curriculum_trainer(hp: StageConfig, **kwargs) -> RefragTrainer:
    return RefragTrainer(**kwargs, sequential=True)


def causal_lm_trainer(hp: StageConfig, **kwargs) -> RefragTrainer:
    return RefragTrainer(**kwargs)


def train_stage(
    stage: str,
    *,
    data: str | os.PathLike,
    out: str | os.PathLike,
    compression: int,
    hp: StageConfig | dict | None = None,
    init: str | os.PathLike | None = None,
    encoder: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    heldout: str | os.PathLike | None = None,
    heldout_baselines: dict[str, float] | None = None,
) -> dict:
    """Train the registered stage ``stage`` (:data:`refrag.stages.STAGES`) and write its model
    folder to ``out``.

    Start from ``init``, a previous stage's folder, or from the base models ``encoder`` and
    ``decoder`` (both folders); ``data`` is what the stage reads (its ``Stage.data``; ``hp.data``
    overrides it). ``hp``
    overrides the stage's default hyperparameters. With ``heldout`` (a validation shard folder)
    and ``hp.eval_steps``, the stage logs its held-out curve (:mod:`refrag.heldout`), against
    ``heldout_baselines`` ({variant: log-ppl}) when given.
    """
    spec = get_stage(stage)
    hp = hp if isinstance(hp, StageConfig) else spec.defaults.merged(hp)
    if (init is None) == (encoder is None and decoder is None) or (encoder is None) != (
        decoder is None
    ):
        raise ValueError("give either init (a previous stage's folder) or encoder and decoder")
    out = Path(out)
    torch.manual_seed(hp.seed)
    if init is None:
        model = RefragModel.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(encoder),
            decoder_name_or_path=str(decoder),
            compression=compression,
        )
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(encoder),
            decoder_name_or_path=str(decoder),
            compression=compression,
        )
    else:
        verify_folder(init)
        model = RefragModel.from_pretrained(init)
        tok = RefragTokenizer.from_pretrained(init)
    if model.config.compression != compression:
        raise ValueError(
            f"{init} was trained with k={model.config.compression}, not k={compression}"
        )
    check_compression(model.config.encoder, compression)  # k + 2 must fit its positions
    model.set_trainable(
        encoder=hp.train_encoder, projector=hp.train_projector, decoder=hp.train_decoder
    )
    dataset, collator = spec.build_dataset(hp.data or data, tok, hp)

    work_dir = out.with_name(out.name + ".work")
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=hp.steps,
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.grad_accum,
        learning_rate=hp.lr,
        weight_decay=hp.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=hp.warmup_ratio,
        logging_steps=hp.logging_steps,
        save_steps=hp.save_steps,
        save_total_limit=None,  # SealCheckpoints keeps the newest sealed one
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        use_cpu=cpu_ddp,  # under torchrun without GPUs: DDP over gloo
        ddp_backend="gloo" if cpu_ddp else None,
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        # on GPUs, collation (Python lists → padded tensors) runs in worker processes so
        # that the GPU never waits on the host; on CPU the cores are busy with the model
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        dataloader_persistent_workers=torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=hp.seed,
        disable_tqdm=False,
    )
    callbacks = [SealCheckpoints()]
    if heldout is not None and hp.eval_steps:
        callbacks.append(
            HeldOutCurve(
                read_shards(heldout),
                tok,
                eval_steps=hp.eval_steps,
                windows_per_step=hp.batch_size * hp.grad_accum * args.world_size,
                baselines=heldout_baselines,
            )
        )
    trainer = spec.build_trainer(
        hp,
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    resume = last_complete_checkpoint(work_dir)
    if resume:
        print(f"resuming {stage} from {resume}")
        resumed_from = json.loads(Path(resume, "trainer_state.json").read_text())["global_step"]
    result = trainer.train(resume_from_checkpoint=resume)
    if resume:  # the Trainer's train_loss covers only the steps after the resume
        result.metrics["train_loss"] = resumed_train_loss(
            trainer.state.log_history, result.metrics["train_loss"], resumed_from, hp.steps
        )
        for entry in trainer.state.log_history:
            if "train_loss" in entry:
                entry["train_loss"] = result.metrics["train_loss"]

    if trainer.is_world_process_zero():
        log = {
            "stage": stage,
            "metrics": result.metrics,
            "log_history": trainer.state.log_history,
            "hp": vars(hp),
        }
        save_model_folder(model, tok, out, extra={"training_log.json": log})
        shutil.rmtree(work_dir, ignore_errors=True)
    return result.metrics


def read_baselines(path: str | os.PathLike) -> dict[str, float]:
    """{variant: log_ppl} of an evaluation JSON (:func:`refrag.evaluation.evaluate_windows`)."""
    return {row["variant"]: row["log_ppl"] for row in json.loads(Path(path).read_text())}


def save_model_folder(
    model: RefragModel, tok: RefragTokenizer, out: Path, extra: dict[str, dict] | None = None
) -> None:
    """Write model + tokenizer (+ JSON files) to a temporary folder, then rename it into place."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            Path(tmp, name).write_text(json.dumps(content, indent=2, default=str) + "\n")
        write_manifest(tmp)  # last: checked by every load (refrag.integrity.verify_folder)


def main(argv: list[str] | None = None) -> None:
    """``python -m refrag.training``: one stage, inline or under torchrun (one log per rank)."""
    import argparse

    from refrag.distributed import rank_log_path
    from refrag.utils import log_to

    parser = argparse.ArgumentParser(prog="python -m refrag.training", description=main.__doc__)
    parser.add_argument("--stage", choices=list(STAGES), required=True)
    parser.add_argument("--k", type=int, required=True, help="compression rate")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="the previous stage's folder")
    start.add_argument("--encoder", help="base encoder folder (with --decoder)")
    parser.add_argument("--decoder", help="base decoder folder (with --encoder)")
    parser.add_argument(
        "--data", required=True, help="what the stage reads: alignment cache or train shards"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--heldout", help="validation shard folder: log the held-out curve every eval_steps"
    )
    parser.add_argument(
        "--heldout-baselines",
        help="the validation set's baselines JSON (refrag.evaluation rows) for the curve",
    )
    parser.add_argument(
        "--hp", default="{}", help="overrides of the stage's defaults, as JSON (StageConfig)"
    )
    parser.add_argument(
        "--rebuilt-by",
        default="{}",
        help="JSON {input path: the step that writes it}, named by a damaged input's error",
    )
    parser.add_argument(
        "--rank-log-dir", help="under torchrun, each rank writes DIR/run-{RANK}.log"
    )
    args = parser.parse_args(argv)
    if (args.encoder is None) != (args.decoder is None):
        parser.error("--encoder and --decoder go together")
    # the Trainer joins torchrun's process group itself (NCCL on GPUs, gloo on CPU)
    per_rank = args.rank_log_dir and int(os.environ.get("WORLD_SIZE", "1")) > 1
    with (
        log_to(rank_log_path(args.rank_log_dir) if per_rank else None),
        one_line_errors(json.loads(args.rebuilt_by)),
    ):
        metrics = train_stage(
            args.stage,
            init=args.init,
            encoder=args.encoder,
            decoder=args.decoder,
            data=args.data,
            heldout=args.heldout,
            heldout_baselines=args.heldout_baselines and read_baselines(args.heldout_baselines),
            out=args.out,
            compression=args.k,
            hp=json.loads(args.hp),
        )
        print(json.dumps(metrics))


if __name__ == "__main__":
    main()
