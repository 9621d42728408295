"""Optional C accelerators (the trim, the tensor ext hook); pure-Python fallbacks when they cannot build."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("trimmer._fasttrim", ["trimmer/_fasttrim.c"], optional=True, extra_compile_args=["-O3"]),
    Extension("trimmer._tensorext", ["trimmer/_tensorext.c"], optional=True, extra_compile_args=["-O3"]),
])
