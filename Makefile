# Everything runs inside a project-local virtual environment (.venv) that these targets create.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint bench data clean nncodec-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned exactly: this CPU wheel is on disk; a range would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# the tests cover the optional extras too: Ray (policy search, started locally) and
	# transformers (tiny random configs, nothing downloaded)
	$(PY) -m pip install --quiet -e '.[dev,bench,policy,hf]'
	touch $(STAMP)

data:
	@if [ -n "$$NNCOMPRESS_DATA" ] || [ -f $(FMNIST) ]; then \
	  echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST missing: installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing. Install it with 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "or point NNCOMPRESS_DATA at a folder holding the four Fashion-MNIST IDX files."; \
	  exit 1; \
	fi

demo: $(STAMP) data
	$(PY) -m nncompress.cli demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP) data nncodec-venv
	$(PY) -m pip install --quiet -e '.[compare]'
	cd benchmarks && ../$(PY) baselines.py && ../$(PY) pruning_han.py && ../$(PY) pruning_li.py \
	  && ../$(PY) deep_compression.py && ../$(PY) coding_throughput.py \
	  && ../$(PY) coding_vs_nncodec.py && ../$(PY) rate_aware.py \
	  && ../$(PY) linear_quant.py && ../$(PY) lowrank.py && ../$(PY) collect_results.py

clean:
	rm -rf $(VENV) runs out

# NNCodec (the MPEG-7 NNR reference codec) for benchmarks/coding_vs_nncodec.py only: its own
# environment (never the project's .venv, never needed by the tests). nncodec's declared deps
# pull a CUDA torchvision that cannot load beside the CPU torch: install it without them, add
# what its coder imports, and stub the two imports of its example applications.
NNC_VENV := benchmarks/.venv-nncodec
nncodec-venv: $(NNC_VENV)/.installed

$(NNC_VENV)/.installed:
	$(PYTHON) -m venv $(NNC_VENV)
	$(NNC_VENV)/bin/pip install --quiet torch==2.13.0 'numpy<2' pybind11 setuptools wheel \
	  scikit-learn tqdm h5py click pandas
	$(NNC_VENV)/bin/pip install --quiet --no-deps --no-build-isolation nncodec==2.1.3
	$(NNC_VENV)/bin/python benchmarks/nncodec_env.py
	touch $@
