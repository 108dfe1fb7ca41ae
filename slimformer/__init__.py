"""slimformer: compress transformer models on a plain CPU, with measured quality loss."""
import logging

__version__ = "0.1.0"

logging.getLogger("slimformer").addHandler(logging.NullHandler())


def load(name_or_path, **kw):
    """Load a bundled model name, a local HF folder, a .gguf file or a slimformer folder."""
    from slimformer.models import load as _load

    return _load(name_or_path, **kw)


# the function shadows its module's name on purpose: ``slimformer.compress(model, recipe)``
from slimformer.compress import compress  # noqa: E402
