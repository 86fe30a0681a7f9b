"""Shared fixtures: tiny models are cheap; the real SmolLM2 is loaded once per session."""

from __future__ import annotations

import os

# Tests never reach the hub: set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest

from coact.models.load import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny connector fits: on a busy 2-core box, intra-op threads only wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device() -> str:
    """Where device-aware tests run their models: `COACT_TEST_DEVICE` (default cpu), so
    the same tests check a GPU when one is there (COACT_TEST_DEVICE=cuda)."""
    name = os.environ.get("COACT_TEST_DEVICE", "cpu")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(f"COACT_TEST_DEVICE={name}, but torch sees no CUDA device")
    return name


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded real model (fetched and converted once per machine, then cached)."""
    return load_model("smollm2-135m")


@pytest.fixture(
    scope="session", params=["tiny-llama", "tiny-gpt-neox", "tiny-gpt-neox-sequential", "tiny-gpt2"]
)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    return load_model(request.param)
