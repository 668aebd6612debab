"""The held-out curve of a training stage: log-perplexity on validation windows as it trains.

:class:`HeldOutCurve` is a Trainer callback. Before the first step it scores the plain
decoder with no context and with the full context as tokens on the validation windows (the
baselines, once: a resumed run finds them in its log); then, every ``eval_steps`` and at the
last step, the REFRAG model reading the context as chunk embeddings. Each point is logged
(``heldout_log_ppl``, ``heldout_retained``: the share of the context's benefit retained,
``heldout_windows_seen``, ``heldout_tokens_seen``), so the stage's ``training_log.json`` holds
the curve of retained share against training tokens that the report plots. The baselines
may be given instead (the workflow passes the validation set's ``eval_baselines`` result,
computed once for every k).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.distributed.fsdp import FSDPModule
from transformers import TrainerCallback

from refrag.eval.scoring import context_benefit_retained, target_nll
from refrag.modeling.tokenization import RefragTokenizer


class HeldOutCurve(TrainerCallback):
    """Log held-out log-perplexity every ``eval_steps`` (see the module docstring)."""

    def __init__(
        self,
        windows: pd.DataFrame,
        tok: RefragTokenizer,
        *,
        eval_steps: int,
        windows_per_step: int,
        batch_size: int = 8,
        baselines: dict[str, float] | None = None,
    ):
        self.windows = windows.to_dict("records")
        self.tok, self.eval_steps, self.batch_size = tok, eval_steps, batch_size
        self.windows_per_step = windows_per_step  # examples per optimizer step, all ranks
        self.tokens_per_window = sum(
            len(self.windows[0][key]) for key in ("context_ids", "target_ids")
        )
        self.baselines: dict[str, float] = dict(baselines or {})

    def _log_ppl(self, model, variant: str) -> float:
        nll, count = target_nll(model, self.tok, self.windows, variant, self.batch_size)
        return nll / count

    def _point(self, args, state, model) -> None:
        """Rank 0 measures; under FSDP2 every rank does (the forward gathers each unit from
        all ranks) with the root's parameters gathered (the baselines call the decoder
        directly, outside the root's forward)."""
        sharded = isinstance(model, FSDPModule)
        if not state.is_world_process_zero and not sharded:
            return
        if sharded:
            model.unshard()
        try:
            self._measure(state, model)
        finally:
            if sharded:
                model.reshard()

    @torch.no_grad()
    def _measure(self, state, model) -> None:
        training = model.training
        model.eval()
        found = [e for e in state.log_history if "heldout_no_context" in e]
        if found:  # a resumed run
            self.baselines = {v: found[0][f"heldout_{v}"] for v in ("no_context", "full_context")}
        else:
            if not self.baselines:
                self.baselines = {
                    v: self._log_ppl(model.decoder, v) for v in ("no_context", "full_context")
                }
            state.log_history.append(
                {f"heldout_{v}": self.baselines[v] for v in ("no_context", "full_context")}
                | {"step": 0}
            )
        log_ppl = self._log_ppl(model, "refrag")
        retained = context_benefit_retained(
            log_ppl, self.baselines["no_context"], self.baselines["full_context"]
        )
        print(
            f"held-out at step {state.global_step}: log-ppl {log_ppl:.4f} "
            f"(no context {self.baselines['no_context']:.4f}, full "
            f"{self.baselines['full_context']:.4f}), retained {retained:.3f}",
            flush=True,
        )
        state.log_history.append(
            {
                "step": state.global_step,
                "heldout_log_ppl": log_ppl,
                "heldout_retained": retained,
                "heldout_windows_seen": state.global_step * self.windows_per_step,
                "heldout_tokens_seen": state.global_step
                * self.windows_per_step
                * self.tokens_per_window,
                "heldout_windows": len(self.windows),
            }
        )
        model.train(training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._point(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps == 0 or state.global_step == state.max_steps:
            self._point(args, state, model)
