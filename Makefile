# mcmoe-gguf: `make demo` and `make test` work on a fresh machine (they build what is missing).
PYTHON    ?= python3.11
VENV      ?= .venv
VPY       := $(VENV)/bin/python
CUDA      ?= 0
CUDA_ARCH ?= 86
RUNTIME_FLAGS := $(if $(filter 1,$(CUDA)),--cuda --cuda-arch $(CUDA_ARCH),)

.PHONY: demo test runtime dev-runtime check-patches save-patches venv tiny clean device-bundle device-check-dry

demo: runtime
	$(VPY) -m mcmoe_gguf.apps.cli demo

# -n 1: tests run in a worker process; a segfault or abort fails that test and a new worker runs the rest
test: runtime
	$(VPY) -m pytest -q -n 1 --max-worker-restart=100 --timeout=1800 --timeout-method=thread tests

# torch first, pinned: it comes from the local wheel (CPU build); an unpinned torch would pull CUDA.
$(VENV)/.deps: pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.deps

# patched llama-cpp-python wheel + llama-quantize/imatrix/perplexity, cached by content hash
runtime: venv
	$(VPY) scripts/build_runtime.py --python $(VPY) $(RUNTIME_FLAGS)

tiny: venv
	$(VPY) -m mcmoe_gguf.apps.cli tiny

# incremental development build in .dev/ (edit .dev/.../vendor/llama.cpp or cpp/, then rerun)
dev-runtime: venv
	$(VPY) scripts/build_runtime.py --dev $(RUNTIME_FLAGS)

# the GPU check (scripts/device_check.py): the bundle to carry to a GPU machine, and its dry run here
device-bundle: runtime
	scripts/device_check.sh --prepare

device-check-dry: runtime
	scripts/device_check.sh --dry-run

save-patches:
	python3 scripts/build_runtime.py --save-patches

check-patches:
	python3 scripts/build_runtime.py --check-patches

clean:
	rm -rf .dev $(VENV) .pytest_cache
