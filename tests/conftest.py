import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned():
    """The Triton linear-attention kernels (attnlab.kernels.linear) fill every output buffer with NaN
    first, so an element a kernel fails to write fails the test (tests/test_kernels_linear*.py)."""
    from attnlab.kernels import linear

    linear.POISON_OUTPUTS = True
    yield
    linear.POISON_OUTPUTS = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
