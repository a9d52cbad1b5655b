"""Small transformers trained here on the Python standard library, and their quality measures.

* :class:`ByteGPT`: a decoder-only byte-level language model (pre-LayerNorm GPT: 256-byte token
  embedding, learned positions, blocks of causal self-attention + 4x GELU MLP, final LayerNorm, output
  head tied to the token embedding). Plain ``nn.Linear`` / ``nn.Embedding`` / ``nn.LayerNorm``
  modules and ``F.scaled_dot_product_attention``; no data-dependent control flow, so it traces with
  ``torch.fx``.
* :class:`ByteEncoder`: the same blocks without the causal mask, mean-pooled over the non-padding
  bytes and L2-normalised: a sentence-embedding model (byte 0 is padding).
* :func:`trained_lm` / :func:`trained_encoder`: train once (seeded, AdamW, linear warmup then cosine
  decay, on :mod:`benchmarks.transformer_data`'s training files) and cache the weights as safetensors
  under ``benchmarks/results/transformer_weights/``, keyed by a hash of the settings and the Python
  version; later calls load the file.
* :func:`lm_perplexity`, :func:`embedding_cosine`, :func:`nn_agreement`, :func:`encoder_retrieval`,
  :func:`mean_pairwise_cosine`: the measures the benchmark reports.

The real public embedding model (all-MiniLM-L6-v2) is in :mod:`benchmarks.transformer_minilm`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from benchmarks import transformer_data as data

WEIGHTS_DIR = Path(__file__).resolve().parent / "results" / "transformer_weights"
VOCAB = 256


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``(B, T, width) -> (B, T, width)``."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        # (B, T, 3 * width) -> (3, B, heads, T, head_dim); indexing instead of unbind keeps fx tracing simple.
        qkv = self.qkv(self.ln1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _init_gpt(model: nn.Module, layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.ndim >= 2:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
            nn.init.normal_(p, std=std)


class ByteGPT(nn.Module):
    """``(B, T)`` int64 bytes -> ``(B, T, 256)`` next-byte logits, ``T <= context``."""

    def __init__(self, width: int = 256, layers: int = 4, heads: int = 4, context: int = 256) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, stored and counted once
        _init_gpt(self, layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ByteEncoder(nn.Module):
    """``(B, T)`` int64 bytes, 0 = padding -> ``(B, width)`` unit-norm sentence embeddings."""

    def __init__(self, width: int = 128, layers: int = 4, heads: int = 4, max_len: int = 48) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        _init_gpt(self, layers)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        keep = idx != 0  # (B, T)
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x, attn_mask=keep[:, None, None, :])
        x = self.ln_f(x) * keep[..., None]
        pooled = x.sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return F.normalize(pooled, dim=-1)


def encode_bytes(texts: list[str], max_len: int) -> torch.Tensor:
    """UTF-8 bytes of each text, cut to ``max_len`` and zero-padded: ``(len(texts), longest)`` int64."""
    rows = [t.encode()[:max_len].replace(b"\0", b" ") for t in texts]
    out = torch.zeros(len(rows), max(1, *map(len, rows)), dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.int64)
    return out


# -- settings, cache ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMSettings:
    width: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 256
    batch: int = 8
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    train_bytes: int = data.TRAIN_BYTES
    seed: int = 0


@dataclass(frozen=True)
class EncoderSettings:
    width: int = 128
    layers: int = 4
    heads: int = 4
    max_len: int = 48
    batch: int = 64
    steps: int = 300
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    temperature: float = 0.05
    seed: int = 0


def settings_key(kind: str, settings: LMSettings | EncoderSettings) -> str:
    """``kind-<hash>``: the hash covers every setting and the Python version (which fixes the text)."""
    blob = json.dumps({"kind": kind, "python": data.python_version(), **asdict(settings)}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _lr_at(step: int, s: LMSettings | EncoderSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to lr / 10


def _optimizer(model: nn.Module, s: LMSettings | EncoderSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, LayerNorm and position table (the usual GPT grouping)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("pos")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.startswith("pos"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))


def _train(model: nn.Module, s: LMSettings | EncoderSettings, loss_at) -> float:  # noqa: ANN001
    """Run ``s.steps`` AdamW steps of ``loss_at(step, rng)``; returns the wall time in seconds."""
    rng = np.random.default_rng(s.seed)
    opt = _optimizer(model, s)
    model.train()
    start = time.perf_counter()
    for step in range(s.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        loss = loss_at(step, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return time.perf_counter() - start


def _cached(key: str, build, train, weights_dir: Path | None):  # noqa: ANN001, ANN202
    """Load ``key`` from the cache, or ``train()`` a fresh ``build()`` and store it with its metadata."""
    path = (weights_dir or WEIGHTS_DIR) / f"{key}.safetensors"
    model = build()
    if path.exists():
        load_model(model, str(path))
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["info"])
        return model.eval(), info
    info = train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: never a half-written cache
    save_model(model, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    return model.eval(), info


# -- language model --------------------------------------------------------------------------------------
def trained_lm(settings: LMSettings = LMSettings(), weights_dir: Path | None = None) -> tuple[ByteGPT, dict]:
    """The trained :class:`ByteGPT` and its training record (time, held-out perplexity, settings)."""
    s = settings

    def build() -> ByteGPT:
        with torch.random.fork_rng():  # seeded weights, the caller's generator left as it was
            torch.manual_seed(s.seed)
            return ByteGPT(s.width, s.layers, s.heads, s.context)

    def train(model: ByteGPT) -> dict:
        text = torch.from_numpy(data.corpus_bytes("train", s.train_bytes)).long()

        def loss_at(step: int, rng: np.random.Generator) -> torch.Tensor:  # noqa: ARG001
            starts = torch.from_numpy(rng.integers(0, len(text) - s.context - 1, size=s.batch))
            chunk = text[starts[:, None] + torch.arange(s.context + 1)]
            return F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten())

        seconds = _train(model, s, loss_at)
        ppl = lm_perplexity(model, data.corpus_bytes("eval"), s.context)
        return {"settings": asdict(s), "python": data.python_version(), "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "heldout": ppl}

    return _cached(settings_key("lm", s), build, train, weights_dir)


@torch.no_grad()
def lm_perplexity(model: nn.Module, eval_bytes: np.ndarray, context: int = 256, batch_size: int = 16,
                  max_chunks: int = 128) -> dict:
    """Next-byte loss on non-overlapping windows of held-out text.

    Window ``i`` is ``eval_bytes[i * context : (i + 1) * context + 1]``; every one of its ``context``
    next-byte predictions counts. ``model`` maps ``(B, T)`` bytes to ``(B, T, 256)`` logits.

    Returns:
        ``{"nats_per_byte", "perplexity", "bits_per_byte", "scored_bytes"}``.
    """
    text = torch.from_numpy(np.asarray(eval_bytes, dtype=np.uint8)).long()
    chunks = min(max_chunks, (len(text) - 1) // context)
    if chunks < 1:
        raise ValueError(f"need more than {context} bytes of evaluation text, got {len(text)}")
    windows = text[torch.arange(chunks)[:, None] * context + torch.arange(context + 1)]
    total = 0.0
    for batch in windows.split(batch_size):
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(), reduction="sum"))
    nats = total / (chunks * context)
    return {"nats_per_byte": nats, "perplexity": math.exp(nats), "bits_per_byte": nats / math.log(2),
            "scored_bytes": chunks * context}


# -- sentence encoder ------------------------------------------------------------------------------------
def _info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch contrastive loss of paired unit vectors ``a``, ``b``: ``(B, d)`` each."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def trained_encoder(settings: EncoderSettings = EncoderSettings(),
                    weights_dir: Path | None = None) -> tuple[ByteEncoder, dict]:
    """The trained :class:`ByteEncoder` (docstring line <-> signature contrastive) and its record."""
    s = settings

    def build() -> ByteEncoder:
        with torch.random.fork_rng():
            torch.manual_seed(s.seed)
            return ByteEncoder(s.width, s.layers, s.heads, s.max_len)

    def train(model: ByteEncoder) -> dict:
        pairs = data.docstring_pairs("train")

        def loss_at(step: int, rng: np.random.Generator) -> torch.Tensor:  # noqa: ARG001
            pick = rng.choice(len(pairs), size=s.batch, replace=False)
            docs = encode_bytes([pairs[i][0] for i in pick], s.max_len)
            sigs = encode_bytes([pairs[i][1] for i in pick], s.max_len)
            return _info_nce(model(docs), model(sigs), s.temperature)

        seconds = _train(model, s, loss_at)
        return {"settings": asdict(s), "python": data.python_version(), "train_seconds": round(seconds, 1),
                "threads": torch.get_num_threads(), "train_pairs": len(pairs),
                "heldout_retrieval": encoder_retrieval(model, s.max_len)}

    return _cached(settings_key("encoder", s), build, train, weights_dir)


@torch.no_grad()
def encoder_retrieval(model: ByteEncoder, max_len: int, pool: int = 128) -> dict:
    """Held-out docstring -> signature retrieval among ``pool`` candidates (chance = 1 / pool)."""
    pairs = data.docstring_pairs("eval")
    n = len(pairs) // pool * pool
    hits = 0
    for i in range(0, n, pool):
        docs = model(encode_bytes([p[0] for p in pairs[i:i + pool]], max_len))
        sigs = model(encode_bytes([p[1] for p in pairs[i:i + pool]], max_len))
        hits += int(((docs @ sigs.T).argmax(1) == torch.arange(pool)).sum())
    return {"top1": hits / n, "chance": 1 / pool, "pairs": n}


# -- embedding measures ----------------------------------------------------------------------------------
def embedding_cosine(ref: torch.Tensor, emb: torch.Tensor) -> dict:
    """Mean and min over sentences of ``cos(ref[i], emb[i])``; ``(N, d)`` each."""
    cos = F.cosine_similarity(ref.double(), emb.double(), dim=1)
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def nearest_other(emb: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of each sentence's most similar other sentence (cosine), ``emb``: ``(N, d)``."""
    unit = F.normalize(emb.double(), dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(1)


def mean_pairwise_cosine(emb: torch.Tensor) -> float:
    """Mean cosine between distinct sentences: near 1, embeddings crowd in a cone and per-sentence
    cosines with a reference stay high even when neighbours change."""
    unit = F.normalize(emb.double(), dim=1)
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / (n * (n - 1)))


def nn_agreement(ref: torch.Tensor, emb: torch.Tensor) -> float:
    """Fraction of sentences whose nearest other sentence is the same under both embeddings."""
    return float((nearest_other(ref) == nearest_other(emb)).double().mean())
