"""Optional C accelerator for the trim; pure-Python (msgspec) fallback when it cannot build."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("trimmer._fasttrim", ["trimmer/_fasttrim.c"], optional=True, extra_compile_args=["-O3"])])
