# fixclf: `make demo` compresses the bundled MLP sample and prints the report; `make test` runs the tests.
# Both create .venv on first use: the CPU torch wheel is installed first so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := build/demo

.PHONY: install demo test bench samples clean

$(BIN)/fixclf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/fixclf

demo: install
	mkdir -p $(DEMO)
	$(BIN)/fixclf compress sample_models/mlp.pt --head hadamard --hidden acdc --output $(DEMO)/mlp.fixclf.pt --force

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python benchmarks/bench_layers.py
	$(BIN)/python benchmarks/bench_samples.py
	$(BIN)/python benchmarks/bench_caffenet_head.py
	$(BIN)/python benchmarks/bench_seeds.py
	$(BIN)/python benchmarks/bench_alexnet.py --max-time 40
	$(BIN)/python benchmarks/bench_plan_cost.py
	$(BIN)/python benchmarks/bench_hard.py
	$(BIN)/python -m pip install -q -e '.[plot]'
	$(BIN)/python benchmarks/compare.py sample_models/mlp.pt --markdown --plot docs/compare_mlp.png
	$(BIN)/python benchmarks/compare.py sample_models/cnn.pt --markdown --plot docs/compare_cnn.png

samples: install
	$(BIN)/python -m pip install -q -e '.[samples]'
	$(BIN)/python sample_models/make_samples.py
	$(BIN)/python sample_models/make_hard_samples.py

clean:
	rm -rf build .pytest_cache *.fixclf.pt *.fixclf.resume.pt *.fixclf.onnx *.fixclf.*.onnx *.fixclf.ort
