"""attnlab: efficient attention families as fast layers, hybrid models, and a cost/recall lab."""

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .model import HybridLM  # noqa: E402

__all__ = ["HybridLM", "ModelConfig", "__version__"]
