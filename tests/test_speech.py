"""Speech: the CTC loss against torch's, greedy decoding, WER/CER against jiwer, the audio
source (WAV + CSV, resampling, padding masks), and the wav2vec2 digits recipe end to end on
espeak-ng's speech (from scratch, then continued on another voice with the feature encoder frozen)."""

import json
import os

import numpy as np
import pytest

from jaxfer import metrics
from jaxfer.data import audio
from jaxfer.train import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ctc_loss_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 12, 6)).astype(np.float32)
    frames = np.ones((3, 12), np.int32)
    frames[1, 9:] = frames[2, 5:] = 0
    labels = np.full((3, 4), -100, np.int32)
    labels[0, :4] = [1, 2, 2, 3]
    labels[1, :2] = [4, 5]
    labels[2, :3] = [1, 1, 1]  # repeats need blanks between them: 5 frames, just enough
    ours, weights = losses.ctc()({"logits": logits, "frame_mask": frames}, {"labels": labels})
    log_probs = torch.log_softmax(torch.as_tensor(logits), -1).transpose(0, 1)
    ref = torch.nn.functional.ctc_loss(log_probs, torch.as_tensor(np.where(labels < 0, 0, labels)),
                                       torch.as_tensor(frames.sum(1)), torch.as_tensor((labels >= 0).sum(1)),
                                       blank=0, reduction="none").numpy()
    np.testing.assert_allclose(np.asarray(ours) * np.asarray(weights), ref, rtol=1e-4)
    np.testing.assert_array_equal(weights, [4, 2, 3])
    # too few frames for the target: weight 0 and a finite loss, never a non-finite step
    frames[2, 3:] = 0
    ours, weights = losses.ctc()({"logits": logits, "frame_mask": frames}, {"labels": labels})
    assert weights[2] == 0 and np.isfinite(np.asarray(ours)).all()


def test_greedy_decoding_and_error_rates_match_jiwer():
    jiwer = pytest.importorskip("jiwer")
    ids = np.array([[0, 3, 3, 0, 3, 1, 1, 4, 0], [2, 2, 2, 0, 0, 0, 5, 5, 5]])
    assert metrics.ctc_greedy(ids) == [(3, 3, 1, 4), (2, 5)]
    assert metrics.ctc_greedy(ids, np.arange(9)[None] < np.array([[9], [4]])) == [(3, 3, 1, 4), (2,)]
    hyps = ["three one four", "nine nine", "zero", ""]
    refs = ["three one four", "nine five nine", "one two", "six"]
    assert metrics.wer(hyps, refs) == pytest.approx(jiwer.wer(refs, hyps))
    assert metrics.cer(hyps, refs) == pytest.approx(jiwer.cer(refs, hyps))
    report = metrics.transcription_report(hyps, refs)
    assert report["sentence_accuracy"] == 0.25 and report["num_examples"] == 4


def test_audio_source_resamples_pads_and_refuses_long_clips(tmp_path):
    from scipy.io import wavfile

    t = np.arange(22050) / 22050
    wavfile.write(tmp_path / "a.wav", 22050, (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    wavfile.write(tmp_path / "b.wav", 8000, np.random.default_rng(0).normal(size=4000).astype(np.float32))
    (tmp_path / "clips.csv").write_text("path,text,label\na.wav,three one,yes\nb.wav,zero,no\n")
    src = audio.read_audio_csv(tmp_path / "clips.csv", text="text", label="label", max_seconds=1.5)
    assert src.label_names == ("no", "yes") and list(src.columns["label"]) == [1, 0]
    vocab = audio.CharVocab("efghinorstuvwxz")
    src = audio.transcribe(src, vocab, max_label_length=12)
    a, b = src[0], src[1]
    assert a["input_values"].shape == (24000,) and a["attention_mask"].sum() == 16000  # 1 s at 16 kHz
    assert b["attention_mask"].sum() == 8000 and not b["input_values"][8000:].any()
    real = a["input_values"][:16000]
    assert abs(real.mean()) < 1e-3 and abs(real.std() - 1) < 1e-2  # normalised per clip
    spectrum = np.abs(np.fft.rfft(real))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins  # the tone survived resampling
    assert vocab.decode([i for i in a["labels"] if i >= 0]) == "three one" and "text" not in a
    arrays = src.to_arrays()
    assert arrays.columns["input_values"].shape == (2, 24000)
    with pytest.raises(ValueError, match="longer than max_samples"):
        audio.read_audio_csv(tmp_path / "clips.csv", max_seconds=0.5)[0]
    (tmp_path / "bad.csv").write_text("path,text\nmissing.wav,zero\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        audio.read_audio_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="'q'"):
        vocab.encode("quiet")


def test_digits_recipe_end_to_end_through_the_cli(tmp_path, monkeypatch):
    """``tiny`` through ``jaxfer train`` and ``jaxfer eval`` (continuing a run on another voice with
    the feature encoder frozen, ``tiny_then``'s rules, runs in colabs/speech_transfer.ipynb)."""
    from jaxfer import cli
    from jaxfer.data import espeak

    if not espeak.available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): it speaks the test audio")
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "configs", "wav2vec2_digits.py")
    fast = ["--config.train.steps=6", "--config.train.eval_every=6", "--config.train.checkpoint_every=6",
            "--no_progress"]
    assert cli.main(["train", "--config", config + ":tiny", "--workdir", "runs/digits_tiny", *fast]) == 0
    first = json.load(open("runs/digits_tiny/test_metrics.json"))["test"]
    assert np.isfinite([first["wer"], first["cer"], first["loss"]]).all() and first["num_examples"] == 2
    assert os.path.exists("data/digits_tiny/clips.csv")  # synthesised once, reused by later runs
