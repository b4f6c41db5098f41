import os

import pytest
import torch

os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_data():
    from nncompress.data import digits

    return digits()
