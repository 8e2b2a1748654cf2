# Build, test and lint entry points for the microvm.firecracker collection.
#
#   make quickstart   # on a fresh Debian/Ubuntu machine, as root
#   make test         # on a fresh Debian/Ubuntu machine, as root (what CI runs)
#
# Single layers: make sanity | unit | integration | lint | docs-lint | changelog-lint
# Everything generated lands in .venv/ or tests/output/ (both git-ignored).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

# Interpreter used to create the development virtualenv.
PYTHON ?= python3
VENV ?= .venv
VENV_ABS := $(abspath $(VENV))
STAMP := $(VENV)/.requirements-dev.stamp
# Throw-away Ansible home for the tools run here (never the user's ~/.ansible).
TOOL_HOME := $(CURDIR)/tests/output/.home

# Debian 12 / Ubuntu 22.04+ packages the test suite needs (all exist in Debian 12).
DEB_PACKAGES := \
	ca-certificates \
	busybox \
	debootstrap \
	dnsmasq-base \
	dnsmasq-utils \
	e2fsprogs \
	git \
	iproute2 \
	iptables \
	iputils-ping \
	openssh-client \
	kmod \
	lz4 \
	mmdebstrap \
	nftables \
	procps \
	python3 \
	python3-pip \
	python3-venv \
	qemu-system-x86 \
	shellcheck \
	systemd \
	systemd-container \
	util-linux \
	zstd

.PHONY: help deps venv sanity unit integration standin molecule compat lint docs-lint changelog-lint test quickstart build clean

help:
	@echo "make quickstart      deps + venv, then run playbooks/quickstart.yml on localhost (root)"
	@echo "make test            deps + venv, then sanity unit integration lint docs-lint changelog-lint (root)"
	@echo "make deps            install the Debian/Ubuntu packages the tests need (root; skipped if present)"
	@echo "make venv            create .venv and install requirements-dev.txt (again when it changes)"
	@echo "make sanity          ansible-test sanity, offline, no Docker (hack/ansible-test-sanity.sh)"
	@echo "make unit            pytest tests/unit"
	@echo "make integration     pytest tests/integration (root; real kernel objects in network namespaces)"
	@echo "make standin         the Firecracker API stand-in's own conformance and boot tests (root)"
	@echo "make molecule        Molecule scenarios on systemd-nspawn hosts over SSH (root; hack/molecule.sh)"
	@echo "make compat          unit + module integration tests again with the newest ansible-core on Python >= 3.12"
	@echo "make lint            ansible-lint --profile production"
	@echo "make docs-lint       antsibull-docs lint-collection-docs --plugin-docs"
	@echo "make changelog-lint  antsibull-changelog lint"
	@echo "make build           build the collection tarball (ansible-galaxy collection build)"
	@echo "make clean           remove tests/output/ (caches included) and built tarballs"

# Installs only what is missing; with everything present it runs no apt-get at
# all (fast, works offline, needs no root).
deps:
	@missing=""; \
	for pkg in $(DEB_PACKAGES); do \
		status=$$(dpkg-query -W -f='$${db:Status-Status}' "$$pkg" 2>/dev/null || true); \
		if [[ $$status != installed ]]; then missing="$$missing $$pkg"; fi; \
	done; \
	if [[ -z $$missing ]]; then \
		echo "deps: all $(words $(DEB_PACKAGES)) packages installed"; \
	elif [[ $$(id -u) -ne 0 ]]; then \
		echo "deps: missing packages:$$missing; run 'make deps' as root" >&2; exit 1; \
	else \
		echo "deps: installing$$missing"; \
		apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive apt-get install -q -y --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

# Re-run pip only when requirements-dev.txt changed since the last install.
$(STAMP): requirements-dev.txt
	@if [[ ! -x $(VENV)/bin/python ]]; then \
		echo "+ $(PYTHON) -m venv $(VENV)"; $(PYTHON) -m venv $(VENV); \
	fi
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

# The tools run by these targets: from the virtualenv, with a throw-away
# Ansible home (hack/*.sh set up the same for themselves).
docs-lint changelog-lint build: export PATH := $(VENV_ABS)/bin:$(PATH)
docs-lint changelog-lint build: export ANSIBLE_HOME := $(TOOL_HOME)/.ansible
docs-lint changelog-lint build: export ANSIBLE_LOCAL_TEMP := $(TOOL_HOME)/tmp/make/local
docs-lint changelog-lint build: export ANSIBLE_REMOTE_TMP := $(TOOL_HOME)/tmp/make/remote

# Extra ansible-test arguments, e.g. SANITY_ARGS='--test pylint'.
SANITY_ARGS ?=
sanity: venv
	VENV="$(VENV_ABS)" hack/ansible-test-sanity.sh $(SANITY_ARGS)

unit: venv
	$(VENV)/bin/pytest tests/unit -q

integration: venv
	@if [[ $$(id -u) -ne 0 ]]; then \
		echo "integration: must run as root (creates network namespaces, TAPs, bridges)" >&2; exit 1; \
	fi
	$(VENV)/bin/pytest tests/integration -q

# The stand-in's own conformance tests (API, CLI, schema, boots under QEMU TCG). A separate
# pytest run: tests/standin has its own conftest.
standin: venv
	$(VENV)/bin/pytest tests/standin -q

# Molecule scenarios on systemd hosts (systemd-nspawn, reached over SSH); see extensions/molecule/.
molecule: venv
	VENV="$(VENV_ABS)" hack/molecule.sh

# The same modules under the newest ansible-core, which needs Python >= 3.12 (Debian 12 has
# 3.11; Ubuntu 24.04, pyenv or a python3.12 package provide one). The module tests run there
# again; the slow image/VM tests stay in `make integration`. The ansible package brings
# ansible.posix, which the host_network role's tasks name (test_host_network.py runs the role):
# its newest release pins the newest ansible-core it supports.
NEWEST_VENV ?= .venv-newest
COMPAT_TESTS := tests/unit tests/integration/test_tap_vnet_hdr.py tests/integration/test_fc_bridge.py \
	tests/integration/test_rootfs_inject.py tests/integration/test_fc_allocation.py \
	tests/integration/test_host_network.py
compat: venv
	@py=$$(hack/newest-python.sh); \
	if [[ -z $$py ]]; then \
		echo "compat: NOT RUN: no Python >= 3.12 on this machine, so the newest ansible-core cannot be installed here"; \
		exit 0; \
	fi; \
	if [[ ! -x $(NEWEST_VENV)/bin/python ]]; then "$$py" -m venv $(NEWEST_VENV); fi; \
	if [[ requirements-dev.txt -nt $(NEWEST_VENV)/.stamp ]]; then \
		$(NEWEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade \
			'ansible-core>=2.20' 'ansible>=13' 'pytest>=8,<10' pyyaml && touch $(NEWEST_VENV)/.stamp; \
	fi; \
	$(NEWEST_VENV)/bin/ansible --version | sed -n 1p; \
	$(NEWEST_VENV)/bin/python --version; \
	$(NEWEST_VENV)/bin/pytest -q $(COMPAT_TESTS)

# Through hack/with-collection.sh so that ansible-lint (offline, see
# .ansible-lint) resolves microvm.firecracker.* to this checkout.
lint: venv
	VENV="$(VENV_ABS)" hack/with-collection.sh ansible-lint --profile production

# antsibull-docs copies the collection (the files git would ship) into an
# ansible_collections tree of its own, so it is pointed at the checkout.
docs-lint: venv
	antsibull-docs lint-collection-docs --plugin-docs .

changelog-lint: venv
	antsibull-changelog lint

# Each layer in turn; the first failure stops the run.
test: deps venv
	$(MAKE) sanity
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) standin
	$(MAKE) molecule
	$(MAKE) compat
	$(MAKE) lint
	$(MAKE) docs-lint
	$(MAKE) changelog-lint
	@echo "test: sanity, unit, integration, standin, molecule, compat, lint, docs-lint, changelog-lint all passed"

# Extra ansible-playbook arguments, e.g. QUICKSTART_ARGS='-e quickstart_state=absent'.
QUICKSTART_ARGS ?=
quickstart: deps venv
	VENV="$(VENV_ABS)" hack/with-collection.sh \
		ansible-playbook -i hack/inventory-localhost.yml playbooks/quickstart.yml $(QUICKSTART_ARGS)

build: venv
	ansible-galaxy collection build --force .

clean:
	rm -rf tests/output
	rm -f microvm-firecracker-*.tar.gz
