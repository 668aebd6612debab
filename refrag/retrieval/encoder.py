"""A sentence encoder as sentence-transformers runs all-MiniLM-L6-v2: the token states of a
plain Hugging Face encoder, mean-pooled over the attention mask, then L2-normalized."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer


class SentenceEncoder:
    """Texts to unit vectors (``encode``); ``folder`` is a Hugging Face encoder folder.

    The maximum length is the folder's ``sentence_bert_config.json`` ``max_seq_length`` when
    it has one (256 for all-MiniLM-L6-v2), else the model's position count."""

    def __init__(self, folder: str | os.PathLike, device: str = "cpu") -> None:
        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder).to(device).eval()
        self.device = device
        st_config = self.folder / "sentence_bert_config.json"
        limit = self.model.config.max_position_embeddings
        if st_config.is_file():
            limit = min(limit, int(json.loads(st_config.read_text()).get("max_seq_length", limit)))
        self.max_length = limit
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """``len(texts) × dim`` float32 unit vectors (mean pooling, L2 normalization)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # longest first: batches of similar length pad little
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode", unit="batch", disable=not progress):
            idx = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[idx] = pooled.float().cpu().numpy()
        return out
