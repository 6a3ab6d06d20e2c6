# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# On a machine with no NVIDIA GPU, every install is constrained to torch's CPU build (constraints.txt);
# with a GPU, pip takes the regular (CUDA) build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CONSTRAINTS := $(if $(HAS_GPU),,-c constraints.txt)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format bench clean

install: $(VENV)/.installed

# The install time is recorded for the demo report (times.install_s).
$(VENV)/.installed: pyproject.toml constraints.txt
	@start=$$(date +%s); \
	$(PYTHON) -m venv $(VENV) && \
	$(PY) -m pip install -q --upgrade pip && \
	$(PY) -m pip install -q $(CONSTRAINTS) -e '.[dev]' && \
	echo $$(( $$(date +%s) - start )) > $(VENV)/.install_s
	@touch $@

demo: install
	$(PY) -m dalle_lightning.demo

# pytest exits 5 when it collected no test: that must fail, not pass.
test: install lint
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Throughput of every stage (benchmarks/bench.py; BENCH_ARGS passes more options, e.g. --only/--quick/--compile).
# With the peer's environment (PEER_PYTHON, or the one ../shared/bench/setup_peer.sh makes at /tmp/peer-dalle2)
# DALLE2-pytorch runs in the same run and the table shows our/peer ratios.
PEER_PYTHON ?= $(wildcard /tmp/peer-dalle2/bin/python)
bench: install
	$(PY) benchmarks/bench.py --json outputs/bench.json $(if $(PEER_PYTHON),--peer $(PEER_PYTHON)) $(BENCH_ARGS)

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs export data/shapes
