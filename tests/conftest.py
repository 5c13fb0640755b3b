import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model.info import quiet_megatron_warnings  # noqa: E402

quiet_megatron_warnings()
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # the suite runs two pytest workers on two cores


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world1():
    """Megatron's process groups for a world of one process (this pytest worker)."""
    from pretrain.parallel import single_process

    with single_process():
        yield
