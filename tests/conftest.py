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


def pytest_collection_finish(session):
    """Start the selected files' Triton-interpreter suites in the background, in the order the
    session reaches them (tests/_triton_tests.py): they are most of the CPU suite's time and run
    beside the other tests."""
    from _triton_tests import start_interpreter_suites

    files = [str(item.path) for item in session.items if item.name == "test_interpreter_suite"]
    start_interpreter_suites(list(dict.fromkeys(files)))


def pytest_sessionfinish(session, exitstatus):
    from _triton_tests import stop_interpreter_suites

    stop_interpreter_suites()


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
