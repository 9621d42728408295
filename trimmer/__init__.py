"""feature-trimmer: send each model only the features it uses.

The library half of the project. It reads model signatures from PyTorch
archives without importing torch, keeps a hot-reloaded allowlist registry and
trims wire payloads without decoding feature values.
"""

__version__ = "0.1.0"
