"""Benchmarks: what trimming costs and saves, measured side by side in one run on one machine.

trim (the trim against a naive unpack/filter/pack and a copy), root (root CPU and added latency against the
stand-in upstream, loadtest/sink.py), leaf (dynamic batching, OIP encodings), leaf_compile (torch.compile vs
eager), leaf_diversify (SSD vs DPP). They live beside the load test, whose reference payload
(loadtest/payload.py) and process helpers (loadtest/procs.py) they use; the services never import them.
Figures are ratios printed as tables, never test assertions. The commands are in bench/cli.py.
"""
