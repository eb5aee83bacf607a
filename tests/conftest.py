import os
import sys

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (set CI=true); local runs keep exploring new ones
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# test helpers (bilevel_problems, _dense_operator) live beside the tests
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny convolutions: one intra-op thread avoids OpenMP spin contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
