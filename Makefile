# The two commands of the README:
#   make lab    set up a virtualenv and run doublenat against its built-in lab
#   make test   install what the tests need (Debian packages included) and run them all

VENV        ?= .venv
PYTHON      ?= python3
PIP         := $(VENV)/bin/pip
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the test suite talks to: real NAT-PMP peers, namespaces, nftables,
# supervisord, Prometheus (scrapes the lab daemon; promtool checks the README's rules),
# and what building the .deb needs.
DEB_PACKAGES := natpmpc miniupnpd miniupnpd-nftables nftables iproute2 supervisor \
                prometheus dh-virtualenv debhelper dh-exec python3-venv build-essential

.PHONY: lab test deps venv lint deb bench fuzz simulate clean

lab: venv
	$(VENV)/bin/doublenat lab

test: deps venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $@

# Installs only what is missing; the miniupnpd and prometheus packages must not start
# their services (RUNLEVEL=1: invoke-rc.d starts nothing; no systemd runs here).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi

lint: venv
	$(VENV)/bin/ruff check .

# The Debian package (dh-virtualenv), built in a copy of the tree under build/deb:
#   make deb [DEB_OUT=dist] [DEB_VERSION=0.1.0+snapshot] [DEB_BUILDDIR=build/deb]
# Needs dh-virtualenv, debhelper and python3-venv (`make deps`); writes dist/doublenat_<version>_<arch>.deb.
deb:
	packaging/build-deb $(if $(DEB_OUT),--out '$(DEB_OUT)') \
		$(if $(DEB_VERSION),--version '$(DEB_VERSION)') \
		$(if $(DEB_BUILDDIR),--builddir '$(DEB_BUILDDIR)')

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

# Long runs kept out of `make test` (see README): the benchmark table, and the fuzzer's
# million datagrams against a running daemon.
bench: deps venv
	$(PIP) install --quiet -e '.[test,bench]'
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

fuzz: venv
	$(VENV)/bin/python -m tests.faults.fuzz --datagrams $(or $(DATAGRAMS),1000000)

# The seeded simulation of the mapping engine (tests/sim): STEPS steps over seeds SEED,
# SEED+1, ... (5,000 each), invariants checked after every step; niced, it takes minutes.
simulate: venv
	nice $(VENV)/bin/python -m tests.sim.run --steps $(or $(STEPS),1000000) --seed $(or $(SEED),1)
