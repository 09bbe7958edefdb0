import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-weight Gemma2 / ModernBERT / CLIP / 16-channel VAE folders, built offline once."""
    from mmdit.encoders.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """A small bucketed shapes dataset: raw shards -> create_phase (64 px) -> bucket index."""
    from mmdit.data.demo_dataset import make_demo_dataset
    from mmdit.data.indices import create_indices
    from mmdit.data.phase import create_phase

    root = tmp_path_factory.mktemp("demo-data")
    make_demo_dataset(root / "raw", num_rows=240, rows_per_shard=80, seed=0)
    create_phase(root / "raw", root / "phase", max_resolution=64, progress=False)
    create_indices(root / "phase", root / "index.npz")
    return {"raw": str(root / "raw"), "phase": str(root / "phase"), "index": str(root / "index.npz")}
