# The two commands a newcomer needs: `make demo` and `make test`.
# Everything they need (virtualenv, Python packages, Kafka broker jars) is installed here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint install kafka-jars system-tools clean

# A venv made before is kept (its packages brought up to pyproject.toml): `python3 -m venv`
# over one made by another Python left it linked to one interpreter and reading another's
# standard library, which broke its ssl module. `make clean` starts afresh.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
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

test: kafka-jars lint system-tools $(BIN)/prometheus $(BIN)/alertmanager
	$(BIN)/python -m pytest tests

# Prometheus's server and promtool, for the tests of dashboards/prometheus/vigil-rules.yaml
# (promtool checks and unit-tests the rules; the server scrapes a worker and a gateway with
# them). From Debian's prometheus package, downloaded and unpacked into the venv: nothing
# installed, no service started. Those on PATH are used where both are.
$(BIN)/prometheus: | $(STAMP)
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then \
	  ln -sf "$$(command -v promtool)" $(BIN)/promtool && ln -sf "$$(command -v prometheus)" $@; \
	else \
	  echo "fetching prometheus and promtool (Debian's prometheus package, unpacked into $(BIN)) ..."; \
	  dir=$$(mktemp -d) && chmod 755 $$dir && \
	  { (cd $$dir && apt-get download -qq prometheus 2>/dev/null) || \
	    { $(SUDO) apt-get update -qq && (cd $$dir && apt-get download -qq prometheus); }; } && \
	  dpkg-deb --fsys-tarfile $$dir/prometheus_*.deb | \
	    tar -x -C $$dir ./usr/bin/promtool ./usr/bin/prometheus && \
	  mv $$dir/usr/bin/promtool $(BIN)/promtool && mv $$dir/usr/bin/prometheus $@.part && \
	  mv $@.part $@; rc=$$?; rm -rf $$dir $@.part; exit $$rc; \
	fi

# Alertmanager and amtool, for the tests of dashboards/prometheus/alertmanager.yml (amtool checks
# its routes; a real Alertmanager takes what the real Prometheus fires and pages a webhook with
# it). Built from source by the Go module proxy into the venv, the version docker-compose.yml
# runs: Debian's reads its templates from /usr/share, so it works only installed, as a service.
ALERTMANAGER_VERSION = v0.27.0
GO = $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
$(BIN)/alertmanager: | $(STAMP)
	@echo "building alertmanager and amtool $(ALERTMANAGER_VERSION) (the Go module proxy, into $(BIN)) ..."
	@test -x "$(GO)" || { echo "no Go toolchain (go on PATH or /usr/local/go/bin/go)" >&2; exit 1; }
	@dir=$$(mktemp -d) && \
	GOBIN=$(abspath $(BIN)) GOPATH=$$dir/go GOCACHE=$$dir/cache GOFLAGS=-modcacherw $(GO) install \
	  github.com/prometheus/alertmanager/cmd/amtool@$(ALERTMANAGER_VERSION) \
	  github.com/prometheus/alertmanager/cmd/alertmanager@$(ALERTMANAGER_VERSION) \
	  >$$dir/said 2>&1; rc=$$?; [ $$rc = 0 ] || cat $$dir/said >&2; rm -rf $$dir; exit $$rc

# Debian packages the tests use (root or sudo): headless Chromium renders `vigil report`, openssl
# makes the certificates of the TLS broker in test_kafka_security, and
# where a Docker client is installed without compose, docker-compose checks docker-compose.yml
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-tools:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="chromium"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1 && \
	   ! command -v docker-compose >/dev/null 2>&1; then missing="$$missing docker-compose"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing ..."; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

bench: kafka-jars
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .vigil
