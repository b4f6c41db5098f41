# Everything runs inside a project-local virtual environment (.venv) that these targets create.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint bench bench-smoke data clean nncodec-venv

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

# `make bench` runs every published section's command (benchmarks/collect_results.py
# published_commands(): SECTIONS with the part commands in BEFORE; a test checks that this list
# is the same), then rebuilds benchmarks/RESULTS.md. Each command is the one printed in its
# RESULTS.md section. On the 2-core machine this takes many hours: the estimate from the
# measured section times is in RESULTS.md's summary.
BENCH_PY := ../$(PY)
bench: $(STAMP) data nncodec-venv
	$(PY) -m pip install --quiet -e '.[compare]'
	cd benchmarks && $(BENCH_PY) baselines.py
	cd benchmarks && $(BENCH_PY) pruning_han.py
	cd benchmarks && $(BENCH_PY) pruning_li.py --model resnet-20
	cd benchmarks && $(BENCH_PY) pruning_li.py --model lenet-5
	cd benchmarks && $(BENCH_PY) deep_compression.py
	cd benchmarks && $(BENCH_PY) coding_throughput.py
	cd benchmarks && $(BENCH_PY) fuzz_decoder.py
	cd benchmarks && $(BENCH_PY) coding_vs_nncodec.py --seeds 0 1 2
	cd benchmarks && $(BENCH_PY) rate_aware.py --models lenet-300-100 --seeds 0 1 2
	cd benchmarks && $(BENCH_PY) rate_aware.py --models lenet-5 --seeds 0 1 2
	cd benchmarks && $(BENCH_PY) linear_quant.py --model lenet-5
	cd benchmarks && $(BENCH_PY) linear_quant.py --model resnet-20
	cd benchmarks && $(BENCH_PY) ort_int8_kernels.py
	cd benchmarks && $(BENCH_PY) lowrank.py
	cd benchmarks && $(BENCH_PY) lowrank.py --parts resnet20 --seeds 0
	cd benchmarks && $(BENCH_PY) lowrank_latency.py
	cd benchmarks && $(BENCH_PY) distill.py
	cd benchmarks && $(BENCH_PY) pq.py --explore
	cd benchmarks && $(BENCH_PY) pq.py --parts lenet300,lenet5 --seeds 0,1,2
	cd benchmarks && $(BENCH_PY) pq.py --parts resnet20 --seeds 0
	cd benchmarks && $(BENCH_PY) early_exit_joint.py
	cd benchmarks && $(BENCH_PY) early_exit.py
	cd benchmarks && $(BENCH_PY) transformers.py --parts vit,gpt --seeds 0,1,2
	cd benchmarks && $(BENCH_PY) transformers.py --parts time
	cd benchmarks && $(BENCH_PY) amc.py --parts lenet
	cd benchmarks && $(BENCH_PY) amc.py --parts resnet --seeds 3 --epochs 2 --episodes 120 --warmup 40 --train-limit 20000
	cd benchmarks && $(BENCH_PY) mobile.py --parts baselines
	cd benchmarks && $(BENCH_PY) mobile.py --parts int8
	cd benchmarks && $(BENCH_PY) mobile.py --parts filter
	cd benchmarks && $(BENCH_PY) mobile.py --parts deep
	cd benchmarks && $(BENCH_PY) collect_results.py

# every benchmark script in --smoke mode (tiny data; seconds to a minute each): tests/test_bench_smoke.py
bench-smoke: $(STAMP)
	$(PY) -m pytest -q tests/test_bench_smoke.py

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
