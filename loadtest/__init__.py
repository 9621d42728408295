"""Load test and payload generator: prove the bytes saved, mode against mode."""
