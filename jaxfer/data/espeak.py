"""Synthesised speech with Debian's ``espeak-ng``: spoken digit sequences in chosen voices.

    csv_path = digits_corpus("data/digits", voices=("en-us", "en-gb"), per_voice=200, seed=0)
    src = read_audio_csv(csv_path, text="text")          # columns path, text, voice, speed, pitch

Every utterance is 2..4 digit words (``"three one four"``) spoken by ``espeak-ng -v <voice>
-s <speed> -p <pitch> -w <file>.wav``, with speed and pitch drawn per utterance from
``speeds`` and ``pitches``: real audio of a small vocabulary in several accents, made
offline. The corpus is written once (``clips.csv`` beside the WAVs) and reused when it
exists with the same settings (``settings.json``; then ``espeak-ng`` is not needed). ``espeak-ng`` must be on the ``PATH`` (``apt-get install
espeak-ng``); without it this raises saying so.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def available() -> bool:
    return shutil.which("espeak-ng") is not None


def _check() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng): it synthesises the speech")
    return exe


def speak(text: str, path: str, voice: str, speed: int = 175, pitch: int = 50) -> str:
    """``text`` spoken by ``voice`` into the WAV file ``path`` (22,050 Hz, 16-bit mono)."""
    subprocess.run([_check(), "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text],
                   check=True, capture_output=True)
    return path


def digits_corpus(root: str | os.PathLike, voices: Sequence[str], per_voice: int, *, seed: int = 0,
                  min_words: int = 2, max_words: int = 4, speeds: Sequence[int] = (140, 170, 200),
                  pitches: Sequence[int] = (35, 50, 65)) -> str:
    """Write ``per_voice`` digit utterances for each voice under ``root``; returns ``root/clips.csv``
    (columns ``path``, ``text``, ``voice``, ``speed``, ``pitch``). The texts of a voice are drawn
    with ``seed`` and the voice's position, so voices say different sequences."""
    root = os.fspath(root)
    settings = dict(voices=list(voices), per_voice=per_voice, seed=seed, min_words=min_words,
                    max_words=max_words, speeds=list(speeds), pitches=list(pitches))
    csv_path, stamp = os.path.join(root, "clips.csv"), os.path.join(root, "settings.json")
    if os.path.exists(csv_path) and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == settings:
                return csv_path
    _check()
    os.makedirs(root, exist_ok=True)
    rows = []
    for v, voice in enumerate(voices):
        rng = np.random.default_rng([seed, v])
        for i in range(per_voice):
            words = [DIGITS[d] for d in rng.integers(0, 10, rng.integers(min_words, max_words + 1))]
            name = f"{voice.replace('+', '_')}_{i:04d}.wav"
            rows.append(dict(path=name, text=" ".join(words), voice=voice, speed=int(rng.choice(speeds)),
                             pitch=int(rng.choice(pitches))))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda r: speak(r["text"], os.path.join(root, r["path"]), r["voice"], r["speed"],
                                      r["pitch"]), rows))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(stamp, "w") as f:
        json.dump(settings, f)
    return csv_path
