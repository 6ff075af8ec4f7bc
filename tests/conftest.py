import os

import pytest
import torch

# Two CPU cores in CI: keep intra-op threads bounded and runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
