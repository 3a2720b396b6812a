# Set-up is the project's job: `make run` and `make test` install what they need,
# and are quick when it is already there (stamp files record what was installed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
ARGS ?=

.PHONY: setup run test test-tf215 benchmark clean

setup: $(VENV)/.installed $(VENV)/.package $(FMNIST) /usr/bin/mpirun /bin/ip

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# The project itself, editable (pyproject.toml): `import trainer, models` from any folder and
# the `mptrain` command; the requirements above are its dependencies, so --no-deps. setuptools
# leaves its build metadata (mptrain.egg-info) in the checkout; the installed copy is in the venv.
$(VENV)/.package: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps -e .
	rm -rf mptrain.egg-info
	touch $@

# Debian packages: real Fashion-MNIST for offline training, Open MPI for the mpirun launch.
$(FMNIST):
	$(call apt_install,dataset-fashion-mnist)

/usr/bin/mpirun:
	$(call apt_install,openmpi-bin)

# iproute2: network namespaces for the simulated two-host test (tests/test_two_hosts.py).
/bin/ip:
	$(call apt_install,iproute2)

define apt_install
	@if [ "$$(id -u)" != 0 ]; then echo "setup: run as root to install Debian package $(1) (apt-get install $(1))"; exit 1; fi
	apt-get install -y --no-install-recommends $(1) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y --no-install-recommends $(1); }
endef

# The stack Habana's Gaudi bridge needs: Python 3.10 (else python3), TensorFlow 2.15 with
# Keras 2 built in, in its own venv. It runs a named core subset of the suite (the Trainer,
# loss scaling, dtype policies, checkpoints, the loop, preemption, devices, distribution, the
# launcher, record shards: Habana's ImageNet recipes read TFRecords) to keep CI short.
PYTHON310 ?= $(firstword $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python) $(PYTHON))
VENV215 := .venv-tf215
PY215 := $(VENV215)/bin/python
TF215_TESTS := tests/test_steps.py tests/test_loss_scale.py tests/test_precision.py \
	tests/test_checkpoint.py tests/test_controller.py tests/test_fit_loop.py tests/test_preemption.py \
	tests/test_devices.py tests/test_distribution.py \
	tests/test_hpu_bridge.py tests/test_eval_padding.py tests/test_lockstep.py \
	tests/test_sharded.py::test_workers_run_equal_steps_from_unequal_files \
	tests/test_records.py::test_shards_from_tensorflows_writer_train \
	tests/test_records.py::test_an_undecodable_image_names_file_and_record

$(VENV215)/.installed: requirements-tf215.txt
	test -x $(PY215) || $(PYTHON310) -m venv $(VENV215)
	$(PY215) -m pip install --quiet --upgrade pip
	$(PY215) -m pip install --quiet -r requirements-tf215.txt
	touch $@

$(VENV215)/.package: pyproject.toml $(VENV215)/.installed
	$(PY215) -m pip install --quiet --no-deps -e .
	rm -rf mptrain.egg-info
	touch $@

test-tf215: $(VENV215)/.installed $(VENV215)/.package $(FMNIST) /usr/bin/mpirun /bin/ip
	$(PY215) -m pytest -q -p no:cacheprovider $(TF215_TESTS)

run: setup
	$(PY) run.py --policy=mixed_bfloat16 $(ARGS)

# The tests whose output depends on the CPU's bf16 instructions, run again as on the other kind
# of CPU (--cpu-bf16=other sets TRAINER_CPU_BF16 against this CPU's own answer, which
# trainer/runtime/devices.py reads): both paths are tested on any machine.
# The main lane runs under Keras 3 (TensorFlow 2.21's default); this core subset runs again
# under Keras 2 (tf_keras), as TensorFlow gives it to a process started with
# TF_USE_LEGACY_KERAS=1 (docs/keras.md): the step, loss scaling, policies, accumulation and
# the tools, whose Keras-specific parts sit in trainer/compat.py. The multi-process tests
# (checkpoints, distribution, the loop) run under Keras 2 in the TF 2.15 lane below.
KERAS2_TESTS := tests/test_steps.py tests/test_loss_scale.py tests/test_precision.py \
	tests/test_accumulation.py tests/test_export.py tests/test_compare.py \
	tests/test_numerics.py tests/test_benchmarks.py tests/test_optimizers.py

CPU_KIND_TESTS := tests/test_devices.py tests/test_tfds.py tests/test_profiling.py tests/test_cli.py

test: setup
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q -p no:cacheprovider --cpu-bf16=other $(CPU_KIND_TESTS)
	TF_USE_LEGACY_KERAS=1 $(PY) -m pytest -q -p no:cacheprovider $(KERAS2_TESTS)
	$(MAKE) --no-print-directory test-tf215

# Speed ratios (ours vs Model.fit, bf16 vs float32, MFU) measured in one run: see BENCHMARKS.md.
benchmark: setup
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) $(VENV215)
