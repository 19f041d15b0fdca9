"""Fixtures that several test files share."""

from __future__ import annotations

import pytest
import torch

from helpers import LAB_TEXT


@pytest.fixture
def one_thread():
    # tiny models: a second intra-op thread only adds synchronisation, and costs a lot on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(LAB_TEXT)
    return str(path)
