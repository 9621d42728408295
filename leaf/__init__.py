"""The leaf worker: loads a model repository, turns trimmed payloads into tensors, batches and runs models.

Modules: convert (features -> tensors from the signature), batcher (dynamic batching off the event
loop), models (repository loading and hot pick-up), server (aiohttp endpoints), metrics (Prometheus),
demo_models (the demo retrieval and ranker), cli. Its benchmarks are in loadtest/bench/.
Only `leaf.cli` is imported by the `trimmer` CLI, and it imports torch lazily.
"""
