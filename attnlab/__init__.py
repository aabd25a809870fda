"""attnlab: efficient attention families as fast layers, hybrid models, and a cost/recall lab."""

__version__ = "0.1.0"
