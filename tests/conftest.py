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
