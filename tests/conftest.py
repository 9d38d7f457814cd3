"""Shared fixtures: tiny random checkpoints in the official layout, generated on the fly."""

from __future__ import annotations

import os

# Tiny models are fastest on one thread, and the servers the tests start must not fight the test
# process for the two cores (OpenMP spin-waiting makes oversubscribed runs ~100x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

from dsm_stt.model.synthetic import random_lm, random_mimi, tiny_config, write_checkpoint

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint directory (config.json, mimi.json, weights, SentencePiece model)."""
    cfg = tiny_config()
    torch.manual_seed(0)
    lm = random_lm(cfg.lm, seed=0)
    mimi = random_mimi(cfg.mimi, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", cfg, lm, mimi)
