"""lmtailor: tailor language models to your domain, task and style."""

__version__ = "0.1.0"
