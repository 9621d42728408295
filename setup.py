"""Optional C accelerators (the trim, the tensor ext hook); pure-Python fallbacks when they cannot build.

TRIMMER_STRICT_BUILD=1 compiles with -Wall -Wextra -Werror and makes a failed build an error, not a silent
fallback (the test build, `make test`); a user's install never fails on a new compiler's new warning.
The headers are `depends`, so that an edit rebuilds and the sdist carries them.
"""

import os

from setuptools import Extension, setup

STRICT = os.environ.get("TRIMMER_STRICT_BUILD") == "1"
FLAGS = ["-O3"] + (["-Wall", "-Wextra", "-Werror"] if STRICT else [])
FASTTRIM_HEADERS = ["trimmer/msgpack_format.h", "trimmer/msgpack_reader.h", "trimmer/nameset.h"]

setup(ext_modules=[
    Extension("trimmer._fasttrim", ["trimmer/_fasttrim.c"], depends=FASTTRIM_HEADERS, optional=not STRICT,
              extra_compile_args=FLAGS),
    Extension("trimmer._tensorext", ["trimmer/_tensorext.c"], optional=not STRICT, extra_compile_args=FLAGS),
])
