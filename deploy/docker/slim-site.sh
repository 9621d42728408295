#!/bin/sh
# Shrink an installed Python environment for a runtime image: strip debug symbols from shared
# objects and drop packages' bundled test suites (never imported at run time). Used by
# root.Dockerfile on /opt/trimmer; tests/test_packaging.py runs it on a copy of
# a fresh install to check the root image's size budget. Needs `strip` (binutils).
set -eu
dir="$1"
# Not the libraries auditwheel vendors into <pkg>.libs/: patched ELF files that strip would corrupt.
find "$dir" -name '*.so*' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} + 2>/dev/null || true
find "$dir" -type d -path '*/site-packages/*' -name tests -prune -exec rm -rf {} +
rm -rf "$dir"/lib/python3*/site-packages/pip "$dir"/lib/python3*/site-packages/pip-*.dist-info "$dir"/bin/pip "$dir"/bin/pip3*
