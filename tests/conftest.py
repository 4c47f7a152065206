# The Triton interpreter must be chosen before triton is first imported (transformers and
# torch._dynamo import it), so this stays the first statement of the test session.
import os

if os.environ.get("FASTMFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A fresh, seeded-at-random generator per test; the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


def pytest_terminal_summary(terminalreporter, exitstatus):
    """On a red run, name the dependency versions that moved since the last green CI run."""
    if exitstatus not in (0, 5):
        from tests.drift import summary

        terminalreporter.write_line(summary(), red=True)


# Markers by module, kept here in one table rather than in each file. `gpu`: the GPU proof, what
# runs on a CUDA machine with FASTMFT_TEST_DEVICE=cuda (`pytest -m gpu`; tests inside other modules
# carry @pytest.mark.gpu themselves). `chaos`: commands killed at random moments.
MODULE_MARKERS = {
    "tests/kernels/test_kernel_gpu_faithful.py": "gpu",
    "tests/kernels/test_kernel_pooling.py": "gpu",
    "tests/kernels/test_kernel_typicality.py": "gpu",
    "tests/kernels/test_kernel_cross_entropy.py": "gpu",
    "tests/kernels/test_kernel_errors.py": "gpu",
    "tests/ops/test_mft_loss.py": "gpu",
    "tests/ops/test_inner_step_cuda.py": "gpu",
    "tests/cli/test_chaos.py": "chaos",
}


def pytest_collection_modifyitems(config, items):
    root = config.rootpath
    for item in items:
        marker = MODULE_MARKERS.get(item.path.relative_to(root).as_posix())
        if marker:
            item.add_marker(marker)
