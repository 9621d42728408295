# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup lint test test-no-ext build-strict demo bench bench-proxies soak clean mutate

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch: the CPU wheel 2.13.0 is pinned only when torch is absent; an unpinned
# `torch` would pull a multi-GB CUDA build. pyproject keeps `torch>=2.4`.
$(STAMP): $(PY) pyproject.toml setup.py trimmer/_fasttrim.c trimmer/_tensorext.c $(wildcard trimmer/*.h)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The tests run on extensions built as strictly as the compiler allows (-Wall -Wextra -Werror: setup.py), then
# the trim and the service again with the extensions switched off (trimmer/extensions.py), as on a machine
# without a compiler: the pure-Python engines must give the same answers.
test: build-strict
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-no-ext

build-strict: setup
	TRIMMER_STRICT_BUILD=1 $(PY) setup.py -q build_ext --inplace --force

# About 2 minutes; root processes the tests start inherit the switch.
NO_EXT_TESTS := tests/test_trim.py tests/test_tensorext.py tests/test_root_service.py tests/test_dataplane.py
test-no-ext: setup
	TRIMMER_NO_EXTENSIONS=1 $(PY) -m pytest -q -p no:cacheprovider $(NO_EXT_TESTS)

# ruff (pycodestyle, pyflakes, bugbear; line length 120) and mypy (trimmer, root, leaf, loadtest); config in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/trimmer demo

bench: setup
	$(VENV)/bin/trimmer bench trim

# The root beside nginx and HAProxy passthrough, load from wrk (docs/root.md, "Benchmark against C proxies").
bench-proxies: setup
	@command -v wrk >/dev/null && command -v nginx >/dev/null || { echo "bench-proxies needs wrk and nginx (haproxy optional): sudo apt-get install wrk nginx-light haproxy"; exit 2; }
	$(VENV)/bin/trimmer root bench --proxies

soak: setup
	$(VENV)/bin/trimmer loadtest --config configs/soak.yaml

# Mutation testing (mutmut, config in pyproject.toml [tool.mutmut]): the trim, the fan-out, the converter and
# version resolution against their fast in-process tests. On demand, not in CI: about 20-30 minutes on 2 cores.
mutate: setup
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(VENV)/bin/mutmut results --all true > mutants/results.txt || $(VENV)/bin/mutmut results > mutants/results.txt
	@grep -c ": killed" mutants/results.txt | xargs echo killed:; grep -vc ": killed" mutants/results.txt | xargs echo not killed:

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache mutants

# Container images (deploy/docker/): podman when present, else docker. IMAGE_TAG=... to tag.
IMAGE_TAG ?= 0.1.0
CONTAINER ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null || echo docker)
.PHONY: image
image:
	$(CONTAINER) build -f deploy/docker/root.Dockerfile -t feature-trimmer-root:$(IMAGE_TAG) .
	$(CONTAINER) build -f deploy/docker/leaf.Dockerfile -t feature-trimmer-leaf:$(IMAGE_TAG) .
