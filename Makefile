# The two commands of the README:
#   make lab    set up a virtualenv and run doublenat against its built-in lab
#   make test   install what the tests need (Debian packages included) and run them all

VENV        ?= .venv
PYTHON      ?= python3
PIP         := $(VENV)/bin/pip
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages that build the .deb (`make deb` installs the missing ones).
BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-setuptools \
                  python3-wheel build-essential
# And what the test suite talks to: real NAT-PMP peers, namespaces, nftables, supervisord,
# Prometheus (scrapes the lab daemon; promtool checks the README's rules); lintian; what
# builds the bookworm and trixie chroots the package is tested in (amd64, and arm64 under
# qemu); dh-virtualenv to build the first package, for the test of the upgrade from it;
# python3-venv for `make venv` and dh-virtualenv.
DEB_PACKAGES := $(BUILD_PACKAGES) natpmpc miniupnpd miniupnpd-nftables nftables iproute2 \
                supervisor prometheus lintian debootstrap qemu-user-static binfmt-support \
                dh-virtualenv python3-venv

# Installs only what is missing; the miniupnpd and prometheus packages must not start
# their services (RUNLEVEL=1: invoke-rc.d starts nothing; no systemd runs here).
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
			--no-install-recommends $$missing; \
	fi
endef

.PHONY: lab test deps venv lint deb deb-matrix chroots bench fuzz simulate clean

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

deps:
	$(call apt_install,$(DEB_PACKAGES))

lint: venv
	$(VENV)/bin/ruff check .

# The Debian package (debhelper + pybuild, Architecture: all), built in a copy of the tree
# under build/deb:
#   make deb [DEB_OUT=dist] [DEB_VERSION=0.1.0+snapshot] [DEB_BUILDDIR=build/deb]
# Installs debhelper, dh-python, pybuild-plugin-pyproject if missing; needs PyPI for the
# pinned routeros-api archive (packaging/vendor.txt); writes dist/doublenat_<version>_all.deb.
deb:
	$(call apt_install,$(BUILD_PACKAGES))
	packaging/build-deb $(if $(DEB_OUT),--out '$(DEB_OUT)') \
		$(if $(DEB_VERSION),--version '$(DEB_VERSION)') \
		$(if $(DEB_BUILDDIR),--builddir '$(DEB_BUILDDIR)')

# Only the package's tests: build, lintian, and the install test on bookworm and trixie,
# amd64 and arm64 (arm64 under qemu-user-static), with each one's timings; `make test` runs
# them too. DEB_MATRIX=trixie-arm64,... picks some.
deb-matrix: deps venv
	$(VENV)/bin/pytest -q -rP tests/packaging/test_deb.py

# Build (or refresh) the cached Debian chroots the tests use, e.g. CHROOTS=trixie-arm64;
# all four by default. Cache: $$DOUBLENAT_CHROOT_CACHE (/var/cache/doublenat-chroots).
chroots: deps venv
	$(VENV)/bin/python -m tests.packaging.chroots build $(CHROOTS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis

# Long runs kept out of `make test` (see README): the benchmark table, and the fuzzer's
# million datagrams against a running daemon.
# gcc (build-essential) builds the opcode-0 generator; perf counts syscalls (strace if not).
bench: deps venv
	$(call apt_install,linux-perf strace)
	$(PIP) install --quiet -e '.[test,bench]'
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

fuzz: venv
	$(VENV)/bin/python -m tests.faults.fuzz --datagrams $(or $(DATAGRAMS),1000000)

# The seeded simulation of the mapping engine (tests/sim): STEPS steps over seeds SEED,
# SEED+1, ... (5,000 each), invariants checked after every step; niced, it takes minutes.
simulate: venv
	nice $(VENV)/bin/python -m tests.sim.run --steps $(or $(STEPS),1000000) --seed $(or $(SEED),1)
