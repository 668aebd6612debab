"""The stages' trainers: Hugging Face ``Trainer`` subclasses with their losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import SequentialSampler
from transformers import Trainer

from refrag.modeling import RefragModel
from refrag.train.stages import StageConfig


class RefragTrainer(Trainer):
    """Trainer on the model's causal-LM loss; ``sequential`` keeps curriculum order.

    The loss is the Trainer's own: it passes ``num_items_in_batch`` (target tokens in the whole
    accumulated batch) to the model, so gradient accumulation averages over tokens instead of
    multiplying the loss by the accumulation steps."""

    def __init__(self, *args, sequential: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequential = sequential
        self._flop_params: int | None = None

    def floating_point_ops(self, inputs: dict) -> int:
        """The Trainer's FLOP count (6 × input tokens × non-embedding parameters) with the
        parameter count read once: the Trainer's own walks every module and parameter of the
        model on every step, host time the GPU waits for."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_params

    def _get_train_sampler(self, train_dataset=None):
        if self.sequential:
            return SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )
        return super()._get_train_sampler(train_dataset)


class AlignmentTrainer(Trainer):
    """The seed's alignment losses between projected chunk embeddings and decoder embeddings.

    Each loss is a sum over the aligned pairs divided by the pairs of the whole accumulated
    batch (on every rank), like the causal-LM loss over tokens: accumulating micro-batches with
    different pair counts gives the loss and gradients of one large batch."""

    def __init__(self, *args, loss_weights: dict[str, float], **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_weights = loss_weights
        self.model_accepts_loss_kwargs = True  # compute_loss divides by num_items_in_batch

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        count = torch.tensor(sum(len(b["pair_decoder_ids"]) for b in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums = alignment_losses(model, **inputs, reduction="sum")
        count = (
            len(inputs["pair_decoder_ids"]) if num_items_in_batch is None else num_items_in_batch
        )
        losses = {name: value / count for name, value in sums.items()}
        loss = sum(self.loss_weights[name] * value for name, value in losses.items())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages the ranks' gradients
        if self.state.global_step % max(1, self.args.logging_steps) == 0 and model.training:
            per_pair = {
                name: (v / len(inputs["pair_decoder_ids"])).item() for name, v in sums.items()
            }
            self.log({f"align_{name}": value for name, value in per_pair.items()})
        return (loss, losses) if return_outputs else loss


def alignment_losses(
    model: RefragModel,
    chunk_input_ids: torch.Tensor,
    chunk_attention_mask: torch.Tensor,
    pair_decoder_ids: torch.Tensor,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """MSE, KL and argmax losses of all aligned pairs of the batch in one pass: each the mean
    over pairs, or with ``reduction="sum"`` the sum over pairs (MSE: of the per-pair mean over
    dimensions).

    Each pair is a span of encoder tokens that decodes to exactly one decoder token. The span
    is read as one chunk, the way the model reads context (CLS state, projected), and that
    chunk embedding should equal the decoder's embedding of the token; compared through the
    (detached) embedding matrix, its similarity profile over the vocabulary should match the
    token's (KL) and pick the token itself (argmax). ``model`` may be DDP-wrapped or sharded
    (FSDP2): the chunk embeddings and the embedding table come from its ``forward``, so that
    gradients are synchronised and the table is whole.
    """
    out = model(
        chunk_input_ids=chunk_input_ids,
        chunk_attention_mask=chunk_attention_mask,
        chunk_embeds_only=True,
    )
    projected = out.chunk_embeds
    table = out.token_embeddings.to(projected.dtype)
    target = table[pair_decoder_ids]
    logits = projected @ table.T
    target_logits = target @ table.T
    sums = {
        "mse": (projected - target).pow(2).mean(-1).sum(),
        "kld": F.kl_div(
            F.log_softmax(logits, -1),
            F.log_softmax(target_logits, -1),
            log_target=True,
            reduction="sum",
        ),
        "argmax": F.cross_entropy(logits, pair_decoder_ids, reduction="sum"),
    }
    if reduction == "sum":
        return sums
    return {name: value / len(pair_decoder_ids) for name, value in sums.items()}


# -- (hp, **Trainer kwargs) -> Trainer --------------------------------------------------------
def alignment_trainer(hp: StageConfig, **kwargs) -> AlignmentTrainer:
    return AlignmentTrainer(**kwargs, loss_weights=hp.loss_weights)


def curriculum_trainer(hp: StageConfig, **kwargs) -> RefragTrainer:
    return RefragTrainer(**kwargs, sequential=True)


def causal_lm_trainer(hp: StageConfig, **kwargs) -> RefragTrainer:
    return RefragTrainer(**kwargs)
