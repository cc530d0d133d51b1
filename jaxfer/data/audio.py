"""Audio: WAV files listed in a CSV (``path`` + transcript or label), resampled, padded, masked.

    src = read_audio_csv("clips.csv", audio="path", text="transcript")   # or label="command"
    src = transcribe(src, CharVocab("abcdefghijklmnopqrstuvwxyz'"))      # CTC targets
    batch = src.gather([0, 1, 2])
    # {"input_values": (3, L) float32, "attention_mask": (3, L) int32, "labels": (3, S) int32, ...}

Each clip is read with ``scipy.io.wavfile`` (PCM 8/16/32-bit or float; several
channels are averaged), resampled to ``sampling_rate`` with a polyphase filter
(``scipy.signal.resample_poly``) and normalised to zero mean and unit variance over
its samples, as HF's ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does. A batch is
padded with zeros to ``max_samples`` (fixed: one compiled shape) and ``attention_mask``
marks the real samples; a clip longer than ``max_samples`` is an error naming it,
before any compute, never silently cut (its transcript would no longer match).

Transcripts become CTC targets with a :class:`CharVocab`: id 0 is the CTC blank
(HF's ``<pad>``), id 1 the word delimiter ``|`` (a space), then one id per character;
``labels`` are padded with ``-100`` to ``max_label_length``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxfer.data.sources import encode_labels

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class CharVocab:
    """Characters for CTC: ``0`` blank, ``1`` word delimiter (space), ``2..`` the ``chars``."""

    chars: str
    blank: str = "<pad>"
    delimiter: str = "|"

    def __post_init__(self):
        if len(set(self.chars)) != len(self.chars) or " " in self.chars or self.delimiter in self.chars:
            raise ValueError(f"vocabulary characters must be distinct, without ' ' or {self.delimiter!r}: "
                             f"{self.chars!r}")

    @property
    def size(self) -> int:
        return len(self.chars) + 2

    @property
    def tokens(self) -> tuple[str, ...]:
        return (self.blank, self.delimiter, *self.chars)

    def encode(self, text: str) -> list[int]:
        """Lower-cased text -> ids (spaces -> the delimiter); an unknown character is an error."""
        index = {c: i + 2 for i, c in enumerate(self.chars)}
        out = []
        for ch in " ".join(text.lower().split()):
            if ch == " ":
                out.append(1)
            elif ch in index:
                out.append(index[ch])
            else:
                raise ValueError(f"character {ch!r} of {text!r} is not in the vocabulary {self.chars!r}")
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Ids (already collapsed, blanks dropped) -> text; the delimiter is a space."""
        tokens = self.tokens
        return "".join(" " if i == 1 else tokens[i] for i in ids if 0 < i < len(tokens)).strip()


def read_wav(path: str | os.PathLike, sampling_rate: int = 16000) -> np.ndarray:
    """A WAV file -> float32 mono samples at ``sampling_rate``, zero mean and unit variance."""
    from scipy import signal
    from scipy.io import wavfile

    rate, x = wavfile.read(os.fspath(path))
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max)
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if rate != sampling_rate:
        g = math.gcd(int(rate), int(sampling_rate))
        x = signal.resample_poly(x, sampling_rate // g, rate // g).astype(np.float32)
    if x.size == 0:
        raise ValueError(f"{path}: no samples")
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AudioSource:
    """Clips read lazily: ``source[i]`` is ``{"input_values", "attention_mask", "id", ...}``
    padded to ``max_samples``, plus ``label`` (class id) and/or ``labels`` (CTC targets,
    after :func:`transcribe`); transcripts stay in ``columns["text"]``."""

    paths: tuple[str, ...]
    columns: dict[str, np.ndarray]
    sampling_rate: int = 16000
    max_samples: int = 16000 * 4
    label_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        wave = read_wav(self.paths[i], self.sampling_rate)
        if wave.size > self.max_samples:
            raise ValueError(f"{self.paths[i]}: {wave.size} samples at {self.sampling_rate} Hz is longer than "
                             f"max_samples={self.max_samples}; raise max_samples or cut the clip")
        values = np.zeros(self.max_samples, np.float32)
        values[: wave.size] = wave
        mask = np.zeros(self.max_samples, np.int32)
        mask[: wave.size] = 1
        numeric = {k: v[i] for k, v in self.columns.items() if v.dtype != object}  # transcripts stay here
        return {"input_values": values, "attention_mask": mask, **numeric}

    def to_arrays(self):
        """Every clip read once into an in-memory :class:`~jaxfer.data.sources.ArraySource` (the
        numeric columns; ``label_names`` kept): small corpora then cost no decoding per step."""
        from jaxfer.data.sources import ArraySource, stack

        return ArraySource(stack([self[i] for i in range(len(self))]), self.label_names)

    def select(self, indices) -> AudioSource:
        indices = np.asarray(indices, np.int64)
        return dataclasses.replace(self, paths=tuple(self.paths[i] for i in indices),
                                   columns={k: v[indices] for k, v in self.columns.items()})

    def with_columns(self, **columns) -> AudioSource:
        return dataclasses.replace(self, columns={**self.columns, **columns})


def read_audio_csv(path: str | os.PathLike, *, audio: str = "path", text: str | None = "text",
                   label: str | None = None, label_names: Sequence[str] | None = None,
                   sampling_rate: int = 16000, max_seconds: float = 4.0) -> AudioSource:
    """A CSV with a header: ``audio`` (WAV paths, relative to the CSV's folder or absolute),
    ``text`` (transcripts) and/or ``label`` (class names -> ids). Missing files and columns
    are errors naming them, before any audio is read."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows")
    wanted = [c for c in (audio, text, label) if c]
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise KeyError(f"{path}: no column(s) {missing}; columns are {list(rows[0])}")
    base = os.path.dirname(os.path.abspath(path))
    paths = tuple(p if os.path.isabs(p) else os.path.join(base, p) for p in (r[audio] for r in rows))
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
        raise FileNotFoundError(f"{path}: {len(absent)} audio file(s) do not exist, e.g. {absent[:3]}")
    columns: dict[str, np.ndarray] = {"id": np.arange(len(rows), dtype=np.int64)}
    names = None
    if text:
        columns["text"] = np.asarray([r[text] for r in rows], dtype=object)
    if label:
        columns["label"], names = encode_labels([r[label] for r in rows], label_names)
    return AudioSource(paths, columns, sampling_rate, int(round(max_seconds * sampling_rate)), names)


def transcribe(source: AudioSource, vocab: CharVocab, max_label_length: int | None = None) -> AudioSource:
    """Add ``labels``: each transcript's ids padded with ``-100`` to ``max_label_length`` (the
    longest by default); a transcript longer than that, or with an unknown character, is an error."""
    ids = [vocab.encode(t) for t in source.columns["text"]]
    n = max_label_length or max(map(len, ids))
    too_long = [t for t, i in zip(source.columns["text"], ids) if len(i) > n]
    if too_long:
        raise ValueError(f"{len(too_long)} transcript(s) longer than max_label_length={n}, e.g. {too_long[0]!r}")
    labels = np.full((len(ids), n), IGNORE, np.int32)
    for row, i in zip(labels, ids):
        row[: len(i)] = i
    return source.with_columns(labels=labels)
