# minibn: every target sets up its own virtual environment (.venv) first.
#   make article   the main job: every lesson, then every figure
#   make gpu-check on a machine with a GPU: install, GPU tests, engines vs functional.py, the GPU bench
#                  table, SyncBN under mpiexec -n 2 (under 5 minutes; exits 3 without a GPU)
#   make test      the test suite, single-process (the fast tests, then the slow ones) and under
#                  mpiexec -n 2, 3, 4; then again on the optional numba kernels; then the wheel,
#                  installed into a fresh virtual environment (needs PyPI), run from a temporary folder
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.minibn-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
MPI_RANKS ?= 2 3 4

.PHONY: all setup article figures lessons notebooks test test-fast test-slow test-mpi test-numba test-install test-cuda-sim bench gpu-check oracle info clean

all: article

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[mpi,jit,dev]'
	@touch $(STAMP)

setup: $(STAMP)

article: $(STAMP)
	$(PY) -m minibn article

figures: $(STAMP)
	$(PY) -m minibn figures

lessons: $(STAMP)
	$(PY) -m minibn lessons

notebooks: $(STAMP)
	$(PY) -m minibn notebooks --force notebooks

test: test-fast test-slow test-mpi test-numba test-install

# the single-process tests in two parts: test-fast (under a minute) leaves out the tests marked slow,
# test-slow runs only those
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests --ignore=tests/mpi

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow tests --ignore=tests/mpi --ignore=tests/test_install.py

test-mpi: $(STAMP)
	@for n in $(MPI_RANKS); do \
	  echo "== tests/mpi under mpiexec -n $$n"; \
	  $(MPIEXEC) -n $$n $(PY) -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi || exit 1; \
	done

# the same tests on the optional numba engine (minibn/engines/numba_loops.py)
test-numba: $(STAMP)
	MINIBN_KERNELS=numba $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/mpi
	MINIBN_KERNELS=numba $(MPIEXEC) -n 2 $(PY) -m mpi4py -m pytest -q -p no:cacheprovider tests/mpi

# the sdist and the wheel built from it; the wheel installed into a fresh virtual environment
# (dependencies from PyPI, pinned by constraints.txt) and its commands run from a temporary folder
test-install: $(STAMP)
	MINIBN_TEST_INSTALL=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_install.py

# the GPU kernels (minibn/engines/cuda_kernels.py) under numba's CUDA simulator; test-slow runs
# the same file in a subprocess (tests/test_cuda_kernels.py), this target runs it directly
test-cuda-sim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py

bench: $(STAMP)
	$(PY) -m minibn bench

# on a machine with a GPU, with the Python that has (or can install) CuPy and numba-cuda: by default
# .venv's; `make gpu-check GPU_PYTHON=python3` uses a preinstalled one, with minibn from this tree
GPU_PYTHON ?= $(PY)
gpu-check:
	@if [ "$(GPU_PYTHON)" = "$(PY)" ]; then $(MAKE) --no-print-directory setup; fi
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m minibn gpu-check

# optional: PyTorch (CPU build) as a test oracle; tests that need it skip without it
oracle: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0'

info: $(STAMP)
	$(PY) -m minibn info

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache notebooks
