import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from threads, and on a shared
    2-core box OpenMP threads only spin. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M (fp32, dequantized from GGUF), loaded once per session."""
    from slimformer.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from slimformer.models import load

    return load("minilm-l6")
