"""lmtailor: tailor language models to your domain, task and style."""

__version__ = "0.1.0"

# The built-in objectives register themselves on import, so every recipe can name them (and their settings).
from lmtailor import objectives as _objectives  # noqa: E402,F401
