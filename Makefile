# Set-up is the project's job: `make run` and `make test` install what they need,
# and are quick when it is already there (stamp files record what was installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS ?=

.PHONY: setup run test test-tf215 clean-venv benchmark

setup: $(VENV)/.installed $(FMNIST) /usr/bin/mpirun

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Debian packages: real Fashion-MNIST for offline training, Open MPI for the mpirun launch.
$(FMNIST):
	$(call apt_install,dataset-fashion-mnist)

/usr/bin/mpirun:
	$(call apt_install,openmpi-bin)

define apt_install
	@if [ "$$(id -u)" != 0 ]; then echo "setup: run as root to install Debian package $(1) (apt-get install $(1))"; exit 1; fi
	apt-get install -y --no-install-recommends $(1) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y --no-install-recommends $(1); }
endef

run: setup
	$(PY) run.py --policy=mixed_bfloat16 $(ARGS)

test: setup
	$(PY) -m pytest -q tests
