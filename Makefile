# `make demo` and `make test` each create .venv on first use (re-installing when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@# tests/test_report.py renders pages in Debian's Chromium (playwright's own browsers are never downloaded)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "warning: chromium is missing and only root can apt-get it; run 'sudo apt-get install chromium'" \
		"(tests/test_report.py needs /usr/bin/chromium)" >&2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenmill run jobs/demo.yaml
	$(BIN)/tokenmill status jobs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest_images.py
	$(BIN)/python benchmarks/tokenize_images.py
	$(BIN)/python benchmarks/tokenize_speech.py
	$(BIN)/python benchmarks/codec.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf runs .pytest_cache
