"""Perplexity of held-out continuations given a context read three ways.

For each window (s context tokens, o target tokens) the decoder predicts the target after:
``no_context`` (only BOS), ``full_context`` (the s context tokens), or ``refrag`` (the context's
chunk embeddings). ``log_ppl`` is the mean negative log-likelihood per target token over all
windows (token-weighted), in nats, as the paper's Table 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refrag.tokenization import IGNORE_INDEX, RefragTokenizer

VARIANTS = ("no_context", "full_context", "refrag")


def window_parts(row: dict, variant: str) -> list[tuple[str, list[int]]]:
    """The parts of one evaluation sequence (see :meth:`RefragTokenizer.encode_parts`)."""
    target = ("text", list(row["target_ids"]))
    if variant == "no_context":
        return [target]
    if variant == "full_context":
        return [("prompt", list(row["context_ids"])), target]
    if variant == "refrag":
        return [("chunks", list(row["context_encoder_ids"])), target]
    raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")


@torch.no_grad()
def target_nll(
    model, tok: RefragTokenizer, windows: Iterable[dict], variant: str, batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL of the target tokens and their count. ``model`` is a ``RefragModel`` for
    ``refrag``, or any causal LM (the plain decoder) for the baselines."""
    rows = list(windows)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc=variant, mininterval=5):
        batch = tok.pad(
            [tok.encode_parts(window_parts(r, variant)) for r in rows[i : i + batch_size]]
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        extra = {}
        if bool(
            batch["attention_mask"].all()
        ):  # no padding: project only positions that predict targets
            first_label = int((labels != IGNORE_INDEX).int().argmax(1).min())
            extra["logits_to_keep"] = labels.shape[1] - first_label + 1
            labels = labels[:, -extra["logits_to_keep"] :]
        if variant == "refrag":
            logits = model(**batch, **extra).logits
        else:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra
            ).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        total += F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ).item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total, count


def context_benefit_retained(log_ppl: float, no_context: float, full_context: float) -> float:
    """(noctx − refrag) / (noctx − full): 1 is all of the full context's benefit, 0 none."""
    gap = no_context - full_context
    return float("nan") if gap == 0 else (no_context - log_ppl) / gap


def evaluate_windows(
    *,
    shards: str,
    out: str,
    checkpoint: str | None = None,
    encoder: str | None = None,
    decoder: str | None = None,
    labels: dict | None = None,
    batch_size: int = 8,
) -> list[dict]:
    """Evaluate a shard folder: a REFRAG ``checkpoint``, or the baselines of the ``decoder``
    (``encoder`` only supplies the tokenizer pair). Writes a JSON list of result rows."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from refrag.data import read_shards
    from refrag.integrity import verify_folder
    from refrag.modeling import RefragModel
    from refrag.utils import pick_device

    windows = read_shards(shards).to_dict("records")
    device = pick_device()
    if checkpoint is not None:
        verify_folder(checkpoint)
        model, tok = (
            RefragModel.from_pretrained(checkpoint),
            RefragTokenizer.from_pretrained(checkpoint),
        )
        stage = json.loads((Path(checkpoint) / "training_log.json").read_text())["stage"]
        runs = [("refrag", model.config.compression, stage)]
    else:
        model = AutoModelForCausalLM.from_pretrained(decoder)
        tok = RefragTokenizer.from_encoder_decoder_pretrained(
            encoder_name_or_path=encoder, decoder_name_or_path=decoder
        )
        runs = [("no_context", None, None), ("full_context", None, None)]
    model.to(device).eval()
    rows = []
    for variant, k, stage in runs:
        nll, count = target_nll(model, tok, windows, variant, batch_size)
        rows.append(
            {
                "variant": variant,
                "k": k,
                "stage": stage,
                "log_ppl": nll / count,
                "n_windows": len(windows),
                "n_tokens": count,
            }
            | (labels or {})
        )
        print(rows[-1])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def perplexity_table(rows: list[dict], final_stage: str | None = None) -> pd.DataFrame:
    """Result rows → the perplexity table, with ``context_benefit_retained`` against the
    baselines of the same decoder and eval set. REFRAG rows of ``final_stage`` are the
    ``refrag`` variant; those of earlier stages are ``refrag_<stage>``."""
    frame = pd.DataFrame(rows)
    is_earlier = (
        (frame["variant"] == "refrag") & frame["stage"].notna() & (frame["stage"] != final_stage)
    )
    frame.loc[is_earlier, "variant"] = "refrag_" + frame.loc[is_earlier, "stage"]
    base = frame[frame["k"].isna()].pivot_table(
        index=["decoder", "eval_set"], columns="variant", values="log_ppl"
    )

    def retained(row) -> float:
        b = base.loc[(row["decoder"], row["eval_set"])]
        return context_benefit_retained(row["log_ppl"], b["no_context"], b["full_context"])

    frame["context_benefit_retained"] = frame.apply(retained, axis=1)
    frame["k"] = frame["k"].astype("Int64")
    first = ["variant", "k", "eval_set", "log_ppl", "context_benefit_retained"]
    return frame[first + [c for c in frame.columns if c not in first]]
