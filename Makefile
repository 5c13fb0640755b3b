# The two commands of the README. Each one creates .venv and installs what it needs on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DATA   := outputs/data/embedded

.PHONY: smoke test setup data data-tiny clean

RUN    := outputs/runs/smoke/$(shell date +%Y%m%d-%H%M%S)

smoke: data  ## the main job: train the scaled-down model on CPU (or the local GPU), on the embedded corpus
	$(VENV)/bin/glm-model-info model=smoke --optimizer
	$(VENV)/bin/glm-pretrain experiment=smoke run.dir=$(RUN)
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(RUN)/tensorboard   (resume or extend: glm-pretrain experiment=smoke run.dir=$(RUN))"

data: $(DATA)/general/manifest.json $(DATA)/code/manifest.json  ## the embedded default corpus, as shards

$(DATA)/general/manifest.json: | $(STAMP)
	$(VENV)/bin/glm-data prepare embedded:general -o $(DATA)/general --overwrite

# code shares general's tokenizer (trained once on both parts), which already holds the FIM tokens
$(DATA)/code/manifest.json: $(DATA)/general/manifest.json
	$(VENV)/bin/glm-data prepare embedded:code --code -o $(DATA)/code --tokenizer $(DATA)/general/tokenizer.json --overwrite

# The optimizer tests run a second time as the other kind of CPU (bf16 native <-> emulated; see
# GLM_CPU_BF16 in optim/newton_schulz.py), so a machine of one kind catches what breaks on the other:
# all of test_optim.py, and the distributed ones on the bf16 path (the others pin fp32).
# the tiny experiment's data: the embedded corpus with a 512-id tokenizer (the tiny model's vocabulary)
data-tiny: outputs/data/tiny/general/manifest.json outputs/data/tiny/code/manifest.json

outputs/data/tiny/general/manifest.json: | $(STAMP)
	$(VENV)/bin/glm-data prepare embedded:general --vocab-size 512 -o outputs/data/tiny/general --overwrite

outputs/data/tiny/code/manifest.json: outputs/data/tiny/general/manifest.json
	$(VENV)/bin/glm-data prepare embedded:code --code -o outputs/data/tiny/code --tokenizer outputs/data/tiny/general/tokenizer.json --overwrite

test: $(STAMP)  ## the whole CPU test suite (GPU tests skip themselves without CUDA)
	$(PY) -m pytest -n 2 --dist loadgroup -q -rs tests
	$(PY) -m pytest -n 2 --dist loadgroup -q -rs --cpu-bf16=other tests/test_optim.py tests/test_optim_parallel.py -k "not test_optim_parallel.py or bf16"

setup: $(STAMP)

# torch==2.13.0 is pinned first so pip takes the CPU wheel on this machine's disk instead of
# downloading a multi-GB CUDA build; on a GPU machine, install torch first, then `pip install -e .[gpu]`.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache $(DATA)
