import os

import pytest
import torch

os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
# one thread: the 2 cores are shared with other jobs, and tiny models gain nothing from more
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_data():
    from nncompress.data import digits

    return digits()
