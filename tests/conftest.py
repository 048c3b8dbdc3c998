import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Benchmark data: $DUALFLOW_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("DUALFLOW_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture
def data_root() -> Path:
    d = data_dir()
    if not d.exists():
        pytest.fail(f"benchmark data not found at {d}: set DUALFLOW_DATA")
    return d


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # pytest-xdist runs one worker per core
    yield
