import sys
from pathlib import Path

# Test helper modules (archives.py, ...) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    """One demo repository build per size for the whole session (leaf/demo_cache.py), not one per test module."""
    import os
    import tempfile

    if "TRIMMER_DEMO_CACHE" not in os.environ:
        os.environ["TRIMMER_DEMO_CACHE"] = tempfile.mkdtemp(prefix="trimmer-demo-cache-")
        config._trimmer_demo_cache = os.environ["TRIMMER_DEMO_CACHE"]


def pytest_unconfigure(config):
    import shutil

    own = getattr(config, "_trimmer_demo_cache", None)
    if own:
        shutil.rmtree(own, ignore_errors=True)
