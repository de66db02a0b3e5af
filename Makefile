.PHONY: install style quality test test-fast bench demo

install:
	python3 -m pip install torch==2.13.0
	python3 -m pip install -e ".[dev]"

style:
	ruff check --fix hf_compress tests examples benchmarks
	ruff format hf_compress tests examples benchmarks

quality:
	ruff check hf_compress tests examples benchmarks
	ruff format --check hf_compress tests examples benchmarks

test:
	python3 -m pytest -q

test-fast:
	python3 -m pytest -q -m "not slow and not multiprocess"

bench:
	python3 benchmarks/bench_distillation.py
	python3 benchmarks/bench_pruning.py
	python3 benchmarks/bench_qat.py
	python3 benchmarks/bench_qlora.py

demo:
	hf-compress demo --output-dir outputs/demo
