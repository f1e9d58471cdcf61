# custos — the two commands are `make demo` and `make test`.
# Both install what they need (Debian packages, a .venv) and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev libtss2-tcti-swtpm0 softhsm2 opensc \
	pkg-config redis-server gcc python3-dev python3-venv openssl gnutls-bin postgresql \
	tpm2-abrmd dbus libtss2-tcti-tabrmd0 docker.io debootstrap docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# loadgroup: tests marked xdist_group(...) share one worker (the swtpm container, decision 0100).
PYTEST_ARGS ?= -n 2 --dist loadgroup

.PHONY: all deps venv demo test bench lint proto clean docker-up docker-down swtpm-image

all: test

# Debian packages: installed only when one is missing, so a second run is a no-op.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv is reinstalled only when a pyproject.toml it installs from changes (stamp file,
# written last: an install that failed midway is retried by the next run). Packages that a
# pyproject no longer lists stay in an existing venv; `make clean` starts from nothing.
INSTALL_INPUTS := pyproject.toml $(wildcard examples/*/pyproject.toml)
$(VENV)/.installed: $(INSTALL_INPUTS) | deps
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e examples/custos-example-attestor
	@touch $@

venv: deps $(VENV)/.installed

demo: venv
	$(PY) -m custos.demo

# make test starts dockerd when it is not running (recorded under /run/custos-testing),
# builds the test image unless its tag exists (custos.testing.docker), runs pytest, and
# stops dockerd afterwards only if it started it, whatever pytest's result (decision 0100).
test: venv
	@rc=0; started=0; \
	if ! $(PY) -m custos.testing.docker running; then \
	  $(PY) -m custos.testing.docker up || exit 1; started=1; fi; \
	$(PY) -m custos.testing.docker image && $(VENV)/bin/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$started = 1 ]; then $(PY) -m custos.testing.docker down; fi; \
	exit $$rc

# The Docker engine for the container tests: `up` starts dockerd unless one answers and
# records that it did; `down` stops only a dockerd `up` started (safe to run twice).
docker-up: venv
	$(PY) -m custos.testing.docker up

docker-down: venv
	$(PY) -m custos.testing.docker down

# custos-swtpm:<hash of the inputs> (also :local): debootstrap + docker import, built
# once (a tag that exists is reused); swtpm/docker-compose.yml runs it, never pulls.
swtpm-image: docker-up
	$(PY) -m custos.testing.docker image

bench: venv
	$(PY) bench/run.py

lint: venv
	$(VENV)/bin/ruff check src attestors tests bench
	$(VENV)/bin/mypy

# The generated gRPC code is committed (a wheel needs no protoc); tests/test_proto.py
# checks it matches proto/. grpcio-tools' protoc makes *_pb2 and the grpcio stubs,
# grpclib's plugin the grpclib stubs; the stubs a side does not serve are not kept.
proto: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m custos._proto.generate src

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
