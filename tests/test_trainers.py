"""Every stage's trainer: gradient accumulation is exact. Two micro-batches of n examples
accumulated give the loss and the gradients of one batch of 2n (the same examples), not
twice them (the Trainer skips its own division by the accumulation steps when the model
takes ``num_items_in_batch``, so a trainer that drops it multiplies both by the steps)."""

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from refrag.io.integrity import write_manifest
from refrag.modeling import RefragModel
from refrag.train.runner import train_stage
from refrag.train.stages import STAGES

from .conftest import TEXT, tiny_config

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class GradientProbe(TrainerCallback):
    """Turns gradient clipping off and keeps the gradients of the first optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        args.max_grad_norm = 0.0  # clipping would hide a scaled gradient

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {
                name: p.grad.detach().clone()
                for name, p in model.named_parameters()
                if p.grad is not None
            }


def dropout_free_config():
    config = tiny_config()
    for key, value in NO_DROPOUT.items():
        setattr(config.encoder, key, value)
    return config


@pytest.fixture(scope="module")
def starts(tmp_path_factory, encoder_dir, decoder_dir, refrag_tokenizer):
    """Where a stage starts, without dropout (so that two runs see the same function): the
    tiny base models for ``align``, a tiny REFRAG checkpoint for the others."""
    root = tmp_path_factory.mktemp("no-dropout")
    config = dropout_free_config()
    torch.manual_seed(0)
    AutoModel.from_config(config.encoder).save_pretrained(root / "enc")
    AutoTokenizer.from_pretrained(encoder_dir).save_pretrained(root / "enc")
    AutoModelForCausalLM.from_config(config.decoder).save_pretrained(root / "dec")
    AutoTokenizer.from_pretrained(decoder_dir).save_pretrained(root / "dec")
    torch.manual_seed(0)
    RefragModel(config).save_pretrained(root / "ckpt")
    refrag_tokenizer.save_pretrained(root / "ckpt")
    write_manifest(root / "ckpt")
    return {"base": {"encoder": root / "enc", "decoder": root / "dec"}, "init": root / "ckpt"}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """Four question rows with answers of different lengths (so micro-batches differ in
    labelled tokens)."""
    path = tmp_path_factory.mktemp("sft") / "qa.jsonl"
    answers = ["Charles Babbage", "1837", "the difference engine of Babbage", "loops"]
    rows = [
        {"question": f"Question {i}?", "answer": a, "context": TEXT[i * 40 : i * 40 + 300]}
        for i, a in enumerate(answers)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_step(stage, starts, data, tmp_path, batch_size, grad_accum):
    """Loss and gradients of one optimizer step over the same 4 examples."""
    probe = GradientProbe()
    start = {"init": starts["init"]} if STAGES[stage].previous else starts["base"]
    hp = {
        "steps": 1,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "lr": 1e-9,
        "logging_steps": 1,
        "seed": 3,
        "max_pairs": 10_000,  # the alignment collator's cap would differ by batch size
        "curriculum": [1, 2],
    }
    out = tmp_path / f"{stage}-{batch_size}x{grad_accum}"
    train_stage(stage, **start, data=data, out=out, compression=4, hp=hp, callbacks=[probe])
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    return next(e["loss"] for e in log if "loss" in e), probe.grads


@pytest.mark.parametrize("stage", list(STAGES))
def test_accumulating_two_batches_gives_the_loss_and_gradients_of_one_twice_the_size(
    stage, starts, shards, alignment_cache, sft_file, tmp_path
):
    data = {"alignment": alignment_cache}.get(STAGES[stage].data, shards)
    data = sft_file if stage == "sft" else data
    loss_one, grads_one = first_step(stage, starts, data, tmp_path, batch_size=4, grad_accum=1)
    loss_two, grads_two = first_step(stage, starts, data, tmp_path, batch_size=2, grad_accum=2)
    assert grads_one and grads_one.keys() == grads_two.keys()
    assert loss_two == pytest.approx(loss_one, rel=2e-3), (loss_one, loss_two)
    norm_one = torch.sqrt(sum(g.float().pow(2).sum() for g in grads_one.values()))
    norm_two = torch.sqrt(sum(g.float().pow(2).sum() for g in grads_two.values()))
    assert float(norm_two) == pytest.approx(float(norm_one), rel=2e-3), (norm_one, norm_two)
    for name, grad in grads_one.items():
        torch.testing.assert_close(grads_two[name], grad, rtol=2e-3, atol=1e-6, msg=name)


def test_the_flop_count_reads_the_parameters_once_and_equals_the_trainers(tmp_path):
    from transformers import Trainer, TrainingArguments

    from refrag.train.trainers import RefragTrainer

    model = RefragModel(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = RefragTrainer(model=model, args=args)
    inputs = {"input_ids": torch.ones(3, 11, dtype=torch.long)}
    expected = Trainer.floating_point_ops(trainer, inputs)
    assert trainer.floating_point_ops(inputs) == expected > 0
    model.num_parameters = None  # read once: a second step does not count again
    assert trainer.floating_point_ops(inputs) == expected
    assert trainer.floating_point_ops({"chunk_input_ids": inputs["input_ids"]}) == 0
