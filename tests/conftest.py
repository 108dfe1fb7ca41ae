import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M (fp32, dequantized from GGUF), loaded once per session."""
    from slimformer.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from slimformer.models import load

    return load("minilm-l6")
