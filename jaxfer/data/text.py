"""Tokenisation of text sources, once per dataset, in vectorised chunks (and cached on disk),
checked against the model.

With a ``cache_dir``, :func:`tokenize` keeps its arrays in
``cache_dir/tokens-<key>.npz``; ``key`` hashes the texts, the tokenizer (its full
``tokenizer.json`` for fast tokenizers, else its vocabulary) and ``max_length``,
so a changed dataset or tokenizer never reads stale tokens and a rerun (a
resumed job, another recipe variant on the same data) skips the tokenizer.

A model's embedding tables bound what it can read: token ids must be in
``[0, vocab_size)`` (an id past the table gives NaN, a negative one silently
wraps around) and sequences at most ``max_positions`` long (the position
table). :func:`fit_max_length` truncates a longer ``max_length`` with a warning;
:func:`check_token_ids` refuses ids outside the vocabulary (a tokenizer that
does not belong to the model) with a :class:`~jaxfer.errors.DataError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import ArraySource
from jaxfer.errors import DataError

logger = logging.getLogger(__name__)

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


def fit_max_length(max_length: int, max_positions: int | None) -> int:
    """``max_length``, truncated (with a warning) to the model's position table."""
    if max_positions is not None and max_length > max_positions:
        logger.warning("max_length %d is longer than the model's %d positions: texts are "
                       "truncated to %d tokens", max_length, max_positions, max_positions)
        return int(max_positions)
    return int(max_length)


def check_token_ids(input_ids: np.ndarray, vocab_size: int | None, where: str = "the data") -> None:
    """Every id in ``[0, vocab_size)``, else a :class:`DataError` naming the largest one."""
    if vocab_size is None or not np.size(input_ids):
        return
    low, high = int(np.min(input_ids)), int(np.max(input_ids))
    if low < 0 or high >= vocab_size:
        raise DataError(f"{where}: token ids span [{low}, {high}] but the model's vocabulary holds "
                        f"[0, {vocab_size}): the tokenizer does not belong to this model (use the "
                        "one saved with its weights)")


def tokenize(
    source: ArraySource,
    tokenizer: Any,
    max_length: int,
    *,
    text: str = "text",
    text_pair: str | None = None,
    chunk_size: int = 1024,
    keep_text: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> ArraySource:
    """Replace the text column(s) of ``source`` with token arrays (see
    :func:`tokenize_texts`). The result is an in-memory source, so every epoch
    reuses the same tokens; with ``cache_dir`` they are also kept on disk (module doc)."""
    cols = source.columns
    pairs = None if text_pair is None else cols[text_pair]
    path = None
    if cache_dir is not None:
        tokenizer = load_tokenizer(tokenizer)
        path = os.path.join(os.fspath(cache_dir), f"tokens-{cache_key(cols[text], pairs, tokenizer, max_length)}.npz")
    if path is not None and os.path.exists(path):
        with np.load(path) as f:
            tokens = {k: f[k] for k in f.files}
    else:
        tokens = tokenize_texts(cols[text], tokenizer, max_length, pairs=pairs, chunk_size=chunk_size)
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npz"
            np.savez(tmp, **tokens)
            os.replace(tmp, path)  # whole or absent, never half-written
    out = source.with_columns(**tokens)
    return out if keep_text else out.without(*[c for c in (text, text_pair) if c])


LAYOUTS = ("seq2seq", "causal_lm")


def tokenize_text_to_text(
    source: ArraySource,
    tokenizer: Any,
    targets: Sequence[str],
    *,
    layout: str,
    eos_id: int,
    max_length: int,
    target_length: int,
    text: str = "text",
    prompt: str = "",
    pad_id: int | None = None,
) -> ArraySource:
    """Text-to-text examples: ``prompt + text`` in, ``targets[i]`` (a string per row) out.

    Targets are tokenised without special tokens and end with ``eos_id``, cut to
    ``target_length`` tokens; ``target_ids`` ``(n, target_length)`` holds them,
    ``-100`` after. The inputs, by ``layout``:

    * ``"seq2seq"`` (T5): ``input_ids``/``attention_mask`` ``(n, max_length)`` of the input;
      ``labels`` = ``target_ids`` (the model shifts them right into its decoder);
    * ``"causal_lm"`` (GPT-2): one sequence ``input + target`` of ``max_length +
      target_length`` tokens, right-padded (``input_ids``, ``attention_mask``), with
      ``labels`` ``-100`` except on the target tokens (the loss is the answer's alone),
      and ``prompt_ids``/``prompt_mask`` ``(n, max_length)``: the input alone, for generation.

    Padding uses ``pad_id`` (default the tokenizer's pad, else ``eos_id``); the text
    column is replaced, the others (``label`` ...) kept.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown text-to-text layout {layout!r}; choose one of {LAYOUTS}")
    tok = load_tokenizer(tokenizer)
    if len(targets) != len(source):
        raise ValueError(f"{len(targets)} targets for {len(source)} examples")
    if pad_id is None:
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    if tok.pad_token_id is None:  # GPT-2's tokenizer has no pad token; padding needs one
        tok.pad_token = tok.convert_ids_to_tokens(eos_id)
    texts = [prompt + str(t) for t in source.columns[text]]
    inputs = tokenize_texts(texts, tok, max_length)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ids = np.where(mask > 0, ids, pad_id).astype(np.int32)
    n = len(texts)
    target_ids = np.full((n, target_length), -100, np.int32)
    vocab = {t: tok(t, add_special_tokens=False)["input_ids"] for t in set(map(str, targets))}
    for i, t in enumerate(map(str, targets)):
        row = list(vocab[t])[: target_length - 1] + [eos_id]
        target_ids[i, : len(row)] = row
    if layout == "seq2seq":
        return source.with_columns(input_ids=ids, attention_mask=mask.astype(np.int32), labels=target_ids,
                                   target_ids=target_ids).without(text)
    length = max_length + target_length
    seq = np.full((n, length), pad_id, np.int32)
    seq_mask = np.zeros((n, length), np.int32)
    labels = np.full((n, length), -100, np.int32)
    for i in range(n):
        real = ids[i][mask[i] > 0]
        answer = target_ids[i][target_ids[i] != -100]
        k, m = len(real), len(answer)
        seq[i, :k], seq[i, k:k + m] = real, answer
        seq_mask[i, : k + m] = 1
        labels[i, k:k + m] = answer
    return source.with_columns(input_ids=seq, attention_mask=seq_mask, labels=labels, target_ids=target_ids,
                               prompt_ids=ids, prompt_mask=mask.astype(np.int32)).without(text)


def _tokenizer_fingerprint(tok: Any) -> bytes:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole definition
        return backend.to_str().encode()
    return repr(sorted(tok.get_vocab().items())).encode() + type(tok).__name__.encode()


def cache_key(texts, pairs, tokenizer: Any, max_length: int) -> str:
    """Hex digest of what tokenising ``texts`` (and ``pairs``) depends on."""
    h = hashlib.sha256()
    h.update(_tokenizer_fingerprint(tokenizer))
    h.update(f"|{int(max_length)}|{len(texts)}|{pairs is not None}|".encode())
    for column in (texts,) if pairs is None else (texts, pairs):
        for t in column:
            h.update(str(t).encode())
            h.update(b"\x00")
    return h.hexdigest()[:24]
