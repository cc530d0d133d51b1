"""Tokenisation of text sources, once per dataset, in vectorised chunks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import ArraySource

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def load_tokenizer(tokenizer: Any):
    """A tokenizer object, or a folder / hub id for ``AutoTokenizer.from_pretrained``.

    (In transformers v5, ``BertTokenizer(vocab_file=...)`` silently maps every token
    to [UNK]; ``AutoTokenizer`` on the folder reads ``tokenizer.json`` correctly.)
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    return tokenizer


def tokenize_texts(
    texts: Sequence[str],
    tokenizer: Any,
    max_length: int,
    *,
    pairs: Sequence[str] | None = None,
    chunk_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Texts (and optional second segments) -> int32 ``(n, max_length)`` arrays.

    Pads to ``max_length`` and truncates longer inputs. Always returns
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` (zeros when the
    tokenizer has no segment ids).
    """
    tok = load_tokenizer(tokenizer)
    n = len(texts)
    out = {k: np.zeros((n, max_length), np.int32) for k in TOKEN_KEYS}
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        args = [list(map(str, texts[lo:hi]))]
        if pairs is not None:
            args.append(list(map(str, pairs[lo:hi])))
        enc = tok(*args, max_length=max_length, padding="max_length", truncation=True,
                  return_token_type_ids=True, return_attention_mask=True,
                  return_tensors="np")
        for k in TOKEN_KEYS:
            if k in enc:
                out[k][lo:hi] = enc[k]
    return out


def tokenize(
    source: ArraySource,
    tokenizer: Any,
    max_length: int,
    *,
    text: str = "text",
    text_pair: str | None = None,
    chunk_size: int = 1024,
    keep_text: bool = False,
) -> ArraySource:
    """Replace the text column(s) of ``source`` with token arrays (see
    :func:`tokenize_texts`). The result is an in-memory source, so every epoch
    reuses the same tokens."""
    cols = source.columns
    tokens = tokenize_texts(cols[text], tokenizer, max_length,
                            pairs=None if text_pair is None else cols[text_pair],
                            chunk_size=chunk_size)
    out = source.with_columns(**tokens)
    return out if keep_text else out.without(*[c for c in (text, text_pair) if c])
