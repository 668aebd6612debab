"""Training stages of a REFRAG model, on the Hugging Face Trainer.

The stages themselves (names, order, data, defaults) are the table in :mod:`refrag.train.stages`;
this module holds what they are made of (dataset builders, losses, trainers) and the one loop
that runs any of them, :func:`train_stage`. The built-in stages:

- ``align`` (the seed's alignment app; "the seed" is the Hydra repository this project grew
  from): a span of encoder tokens that decodes to one decoder token (:mod:`refrag.data.alignment`)
  is read as a chunk, and its projected CLS state learns to become that token's embedding,
  with MSE, KL and argmax (cross-entropy) losses over all pairs of a batch at once.
- ``reconstruct`` (paper stage 1): decoder frozen; encoder + projector learn to reproduce the
  context's tokens from its chunk embeddings, with a mixed-length curriculum from 1 chunk up
  to the whole context.
- ``cpt`` (paper stage 2, continual pretraining): read the context as chunk embeddings and
  predict the next tokens (next-paragraph prediction), decoder trained; ``cpt_frozen`` is its
  frozen-decoder ablation.
- ``sft`` (paper stage 3) lives in :mod:`refrag.train.sft`; ``mixed`` (continual pretraining on
  inputs with a random fraction of chunks as tokens) and ``policy`` (REINFORCE on the
  chunk-selection policy) in :mod:`refrag.eval.selective`.

Each stage writes a Hugging Face folder (model, tokenizer, ``training_log.json``) atomically;
Trainer checkpoints live beside it in ``<out>.work/`` and a rerun resumes from the newest
complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from refrag.data.shards import read_shards
from refrag.io.integrity import atomic_folder, disk_full_guard, verify_folder, write_manifest
from refrag.modeling import RefragModel
from refrag.modeling.limits import check_compression
from refrag.modeling.tokenization import RefragTokenizer
from refrag.train.heldout import HeldOutCurve
from refrag.train.launch import Parallel, ParallelError
from refrag.train.resume import SealCheckpoints, last_complete_checkpoint, resumed_train_loss
from refrag.train.sharding import full_state_dict, trainer_fsdp_args
from refrag.train.stages import StageConfig, get_stage
from refrag.train.throughput import ran_strategy, sample_flops, throughput, tokens_per_sample


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
    parallel: Parallel | dict | None = None,
    callbacks: list[TrainerCallback] | tuple = (),
) -> dict:
    """Train the registered stage ``stage`` (:data:`refrag.train.stages.STAGES`) and write its model
    folder to ``out``.

    Start from ``init``, a previous stage's folder, or from the base models ``encoder`` and
    ``decoder`` (both folders); ``data`` is what the stage reads (its ``Stage.data``; ``hp.data``
    overrides it). ``hp``
    overrides the stage's default hyperparameters. With ``heldout`` (a validation shard folder)
    and ``hp.eval_steps``, the stage logs its held-out curve (:mod:`refrag.train.heldout`), against
    ``heldout_baselines`` ({variant: log-ppl}) when given. ``parallel`` (the run's
    :class:`~refrag.train.launch.Parallel`; default: as the process finds itself, DDP under
    torchrun) chooses FSDP2, activation checkpointing and bf16. ``callbacks`` are added to the
    Trainer's (tests use them to read gradients).
    """
    spec = get_stage(stage)
    hp = hp if isinstance(hp, StageConfig) else spec.defaults.merged(hp)
    parallel = parallel if isinstance(parallel, Parallel) else Parallel.from_dict(parallel)
    if parallel.strategy == "fsdp" and spec.unsharded:
        print(f"{stage} trains with DDP, not FSDP: {spec.unsharded}", flush=True)
        parallel = replace(parallel, strategy="ddp")
    if parallel.strategy == "fsdp" and not torch.cuda.is_available():
        raise ParallelError(
            "strategy fsdp needs GPUs: on CPU the Trainer would silently run DDP "
            "(accelerate shards only on accelerators)"
        )
    fsdp = parallel.strategy == "fsdp"
    load = {"dtype": torch.float32} if fsdp else {}  # fp32 masters: one dtype per FSDP unit
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
            **load,
        )
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=str(encoder),
            decoder_name_or_path=str(decoder),
            compression=compression,
        )
    else:
        verify_folder(init)
        model = RefragModel.from_pretrained(init, **load)
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
    cuda = torch.cuda.is_available()
    cpu_ddp = not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1
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
        bf16=cuda and torch.cuda.is_bf16_supported() and parallel.mixed_precision == "bf16",
        use_cpu=cpu_ddp,  # under torchrun without GPUs: DDP over gloo
        ddp_backend="gloo" if cpu_ddp else None,
        ddp_find_unused_parameters=False,
        report_to="none",
        remove_unused_columns=False,
        # on GPUs, collation (Python lists → padded tensors) runs in worker processes, a few
        # batches ahead, into pinned memory copied without blocking, so that the GPU never
        # waits on the host; on CPU the cores are busy with the model
        dataloader_num_workers=4 if cuda else 0,
        dataloader_prefetch_factor=4 if cuda else None,
        dataloader_persistent_workers=cuda,
        dataloader_pin_memory=cuda,
        **({"accelerator_config": {"non_blocking": True}} if cuda else {}),
        seed=hp.seed,
        disable_tqdm=False,
        torch_compile=parallel.compile,
        **trainer_fsdp_args(parallel, model),
    )
    callbacks = [SealCheckpoints(), *callbacks]
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
    with disk_full_guard(work_dir):  # a checkpoint save on a full disk: one line
        result = trainer.train(resume_from_checkpoint=resume)
    if resume:  # the Trainer's train_loss covers only the steps after the resume
        result.metrics["train_loss"] = resumed_train_loss(
            trainer.state.log_history, result.metrics["train_loss"], resumed_from, hp.steps
        )
        for entry in trainer.state.log_history:
            if "train_loss" in entry:
                entry["train_loss"] = result.metrics["train_loss"]

    # FSDP: the sharded weights gathered (a collective: every rank) into a plain HF folder
    weights = full_state_dict(model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        ran = ran_strategy(trainer)
        sample_tokens = tokens_per_sample(dataset)
        flops = sample_flops(
            encoder_params=model.encoder.num_parameters(),
            decoder_params=model.decoder.num_parameters(),
            encoder_tokens=sample_tokens[0],
            decoder_tokens=sample_tokens[1],
            train_encoder=model.config.train_encoder,
            train_projector=model.config.train_projector,
            train_decoder=model.config.train_decoder,
        )
        log = {
            "stage": stage,
            "metrics": result.metrics,
            "log_history": trainer.state.log_history,
            "hp": vars(hp),
            "parallel": ran,
            "throughput": throughput(result.metrics, sample_tokens, flops, ran["world_size"]),
        }
        with disk_full_guard(out):
            save_model_folder(model, tok, out, extra={"training_log.json": log}, weights=weights)
        shutil.rmtree(work_dir, ignore_errors=True)
    return result.metrics


def read_baselines(path: str | os.PathLike) -> dict[str, float]:
    """{variant: log_ppl} of an evaluation JSON (:func:`refrag.eval.perplexity.evaluate_windows`)."""
    return {row["variant"]: row["log_ppl"] for row in json.loads(Path(path).read_text())}


def save_model_folder(
    model: RefragModel,
    tok: RefragTokenizer,
    out: Path,
    extra: dict[str, dict] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model + tokenizer (+ JSON files) to a temporary folder, then rename it into place;
    ``weights``: the model's full state dict where its parameters are sharded."""
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
        tok.save_pretrained(tmp)
        for name, content in (extra or {}).items():
            Path(tmp, name).write_text(json.dumps(content, indent=2, default=str) + "\n")
        write_manifest(tmp)  # last: checked by every load (refrag.io.integrity.verify_folder)
