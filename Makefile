# Set-up is part of every target: `make demo` and `make test` create .venv when it is absent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
OUT ?= out

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

# torch comes from the CPU wheel on disk through constraints.txt (torch==2.13.0); without the
# pin pip pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,bench,llm,serve,video]"
	touch $@

# The main job on the embedded default model (proof-llama): export a bundle, then ask it
# about a freshly generated proof-task image.
demo: venv
	mkdir -p $(OUT)
	$(VENV)/bin/ib-export --out $(OUT)/bundle
	$(PY) -m ib_edge.bench.demo $(OUT)/demo.png --seed 7
	$(VENV)/bin/ib-run --bundle $(OUT)/bundle $(OUT)/demo.png "What color is the circle?"

# Side-by-side report of fp32 / fp16 / int8 bundles of the proof model (see README).
bench: venv
	mkdir -p $(OUT)
	for p in fp32 fp16 int8; do $(VENV)/bin/ib-export proof-llama --precision $$p --out $(OUT)/proof-llama-$$p --quiet; done
	$(VENV)/bin/ib-bench --bundle $(OUT)/proof-llama-fp32 --bundle $(OUT)/proof-llama-fp16 \
		--bundle $(OUT)/proof-llama-int8 --n-eval 200 --runs 20 --report $(OUT)/bench

test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(OUT) .pytest_cache
