import os

import pytest
import torch

# CI has two cores: bound intra-op threads unless the caller chose (OMP_NUM_THREADS=1 on a busy machine).
if 'OMP_NUM_THREADS' not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='session')
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
