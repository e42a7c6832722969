# The two commands a newcomer needs: `make demo` and `make test`.
# Everything they need (virtualenv, Python packages, Kafka broker jars) is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint install kafka-jars chromium clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Apache Kafka 3.9 jars, resolved from Maven Central into the cache (once).
kafka-jars: $(STAMP)
	$(BIN)/vigil dev kafka fetch

demo: kafka-jars
	$(BIN)/vigil demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline connectors tests bench dashboards
	$(BIN)/mypy

test: kafka-jars lint chromium
	$(BIN)/python -m pytest tests

# headless Chromium renders `vigil report` in the tests (Debian's package; needs root or sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing Debian's chromium for the report test ..."; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

bench: kafka-jars
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .vigil
