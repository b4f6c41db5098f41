import os

import pytest
import torch

os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
# the CLI's --threads auto reads this: commands run in-process keep the suite at one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")
# one thread: the 2 cores are shared with other jobs, and tiny models gain nothing from more
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_data():
    from nncompress.data import digits

    return digits()
