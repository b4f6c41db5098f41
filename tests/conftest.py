import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles: "ci" (the default here) drops the per-example deadline and the too-slow
# health check, because the 2 cores are shared with other jobs and timings vary several-fold;
# "dev" keeps Hypothesis's defaults. Choose with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# the CLI's --threads auto reads this: commands run in-process keep the suite at one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")
# one thread: the 2 cores are shared with other jobs, and tiny models gain nothing from more
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_data():
    from nncompress.data import digits

    return digits()
