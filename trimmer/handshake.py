"""The allowlist handshake: the root names the signature its trim came from, the leaf checks it.

A root and a leaf reload a swapped model archive at different moments (the root
re-reads signatures in ~200 ms, the leaf loads and warms the model in 0.5 s or
more). In that window a trimmed body could reach a model version that reads a
feature the trim dropped, and the model would answer 200 with a defaulted
input: a wrong answer. So every trimmed request carries the digest of the
input names its allowlist was built from:

    root ──POST, X-Trimmer-Signature: 3f9c…──> leaf
         <──412 + X-Trimmer-Mismatch: allowlist── (digest != the version it would run)
    root ──POST, untrimmed, no digest─────────> leaf   (fail open; or 503 if the
                                                        body was already released)

Only the set of input names matters for the promise "trimming never changes an
answer" (the trim keeps exactly those names), so the digest covers nothing else:
a new archive with the same inputs and new weights does not trip it.
Third-party upstreams ignore the header; the equivalence audit is their net.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

SIGNATURE_HEADER = "X-Trimmer-Signature"  # root -> leaf: digest of the input names the trim kept
MISMATCH_HEADER = "X-Trimmer-Mismatch"  # leaf -> root on a 412: value "allowlist"
MISMATCH_STATUS = 412  # Precondition Failed: the header's precondition did not hold; nothing ran
MISMATCH_CODE = "allowlist_mismatch"  # the JSON body's "code"


def input_digest(input_names: Iterable[str]) -> str:
    """16 hex chars of SHA-256 over the sorted, distinct input names, one per line."""
    joined = "\n".join(sorted(set(input_names))).encode("utf-8")
    return hashlib.sha256(joined).hexdigest()[:16]


__all__ = ["SIGNATURE_HEADER", "MISMATCH_HEADER", "MISMATCH_STATUS", "MISMATCH_CODE", "input_digest"]
