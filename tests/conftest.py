"""Shared fixtures: an isolated preset cache and the tiny-test model (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

import posttrain  # noqa: F401  (sets MKL_CBWR before any test runs a torch product: posttrain/kernels.py)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on a 2-core machine: one thread each, here and in every `posttrain run` they
    # start (runner.intra_op_threads reads OMP_NUM_THREADS), so they share the cores instead of oversubscribing
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["POSTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("posttrain-cache"))
    # The real vocabularies (models/vocabs.py) are fetched once per machine, not once per session: hash-pinned.
    os.environ.setdefault("POSTTRAIN_VOCAB_CACHE", os.path.expanduser("~/.cache/posttrain/vocabs"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache):
    from posttrain.models import resolve_model_path

    return resolve_model_path("tiny-test", seed=0)


@pytest.fixture()
def tiny(tiny_dir):
    """A fresh (model, tokenizer) pair of the tiny-test preset."""
    from posttrain.models import load_model, load_tokenizer

    return load_model(tiny_dir), load_tokenizer(tiny_dir)
