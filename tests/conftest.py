import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import quiet_megatron_warnings  # noqa: E402

quiet_megatron_warnings()
warnings.filterwarnings("ignore", category=DeprecationWarning)
torch.set_num_threads(1)  # the suite runs two pytest workers on two cores


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16", choices=("detect", "native", "emulated", "other"), default="detect",
        help="behave as a CPU that multiplies bf16 natively or emulates it (sets GLM_CPU_BF16, which "
             "spawned processes inherit); 'other' is the kind this CPU is not. Only Muon's "
             "ns_dtype=auto reads it.")


def pytest_configure(config):
    from optim.newton_schulz import CPU_BF16_ENV, cpu_bf16_detected

    kind = config.getoption("--cpu-bf16")
    if kind == "other":
        kind = "emulated" if cpu_bf16_detected() else "native"
    if kind != "detect":
        os.environ[CPU_BF16_ENV] = kind


def pytest_report_header(config):
    from optim.newton_schulz import CPU_BF16_ENV, cpu_bf16_detected, native_bf16

    detected = "native" if cpu_bf16_detected() else "emulated"
    running = "native" if native_bf16(torch.device("cpu")) else "emulated"
    forced = f" (forced by {CPU_BF16_ENV})" if os.environ.get(CPU_BF16_ENV) else ""
    return f"CPU bf16: this CPU {detected}; tests run as {running}{forced}"


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
