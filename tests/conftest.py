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


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One real Slurm for every test that needs one (tests/slurm_cluster.py), in the xdist group
    "slurm": three namespace nodes (p1, p2, p3) where this machine can make them, else this machine
    as its one node (the multi-node tests then skip, or fail under CI=true)."""
    from tests import slurm_cluster

    ci = os.environ.get("CI", "").lower() == "true"
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"), nodes=3)
    except slurm_cluster.Unavailable as e:
        if ci and "namespace" not in str(e):
            pytest.fail(f"no local Slurm under CI=true: {e}")
        try:
            cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm1"))
            cluster.why_not_nodes = str(e)
        except slurm_cluster.Unavailable as e1:
            if ci:  # CI must run them: a skip there hides a broken fixture
                pytest.fail(f"no local Slurm under CI=true: {e1}")
            pytest.skip(f"no local Slurm: {e1}")
    yield cluster
    cluster.stop()
