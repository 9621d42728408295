"""Load test, payload generator, benchmarks and the stand-in upstream: prove the bytes saved, mode against mode.

The top layer: it builds on trimmer, root and leaf (and starts them as processes); none of them imports it
(tests/test_layering.py). payload.py holds the reference payload every benchmark uses; bench/ the benchmarks;
sink.py the stand-in upstream (`python -m loadtest.sink`) the tests and `trimmer root bench` put behind a root.
"""
