"""The README's Python example runs as written, on a tiny CNN and a tiny token model built here."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


class TinyLM(nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` like a Hugging Face encoder; returns hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(200, 32)
        self.ln = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)

    def forward(self, input_ids, attention_mask):
        x = self.ln(self.embed(input_ids))
        return (x + self.fc2(torch.relu(self.fc1(x)))) * attention_mask[..., None]


def _python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "legonet.compress(" in b)
    # the README's placeholders: "..." for more batches; a GPU where there is none
    block = block.replace(", ...]", "]")
    if not torch.cuda.is_available():
        block = block.replace('device="cuda"', 'device="cpu"')
    return block


def test_readme_python_example_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential(OrderedDict(features=features, classifier=nn.Linear(64, 10))).eval()
    images = torch.randn(512, 3, 8, 8)
    ids, mask = torch.randint(0, 50, (8, 12)), torch.ones(8, 12, dtype=torch.long)
    scope = {"model": model, "images": images, "lm": TinyLM().eval(), "ids": ids, "mask": mask,
             "batches": [images[i:i + 64] for i in range(0, 128, 64)]}
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_block(), str(README), "exec"), scope)  # noqa: S102 - our own README
    assert (tmp_path / "model.lego").is_file()
    assert len(scope["cms"]) == 3
