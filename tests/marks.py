"""Shared pytest marks."""

from __future__ import annotations

import pytest
import torch

# GPU code paths: run where CUDA is present (a lent GPU machine), skipped in CI (no GPU there).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
