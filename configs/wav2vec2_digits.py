"""A small wav2vec2 trained with CTC to transcribe spoken digits ("three one four"), from scratch.

Data: ``espeak-ng`` speaks 2..4 digit words per utterance in the chosen voices, speed and
pitch varying per utterance (:mod:`jaxfer.data.espeak`; written once under
``data.synthesize.root``), 16 kHz. No pretrained wav2vec2 installs offline, so the model
is built from the family config (96k parameters, 20 ms frames) and trained
here; a real user would start from ``facebook/wav2vec2-base`` (``model.source``) with the
same task section. Characters are the CTC targets (``data.vocab``); evaluation reports
WER and CER of greedy transcripts.

    jaxfer train --config configs/wav2vec2_digits.py            --workdir runs/digits_a   # voices A
    jaxfer train --config configs/wav2vec2_digits.py:b_scratch  --workdir runs/digits_b   # 24 clips of voice B
    jaxfer train --config configs/wav2vec2_digits.py:a_then_b   --workdir runs/digits_ab  # A's model, then B

``a_then_b`` starts from the run in ``model.init_from`` (``runs/digits_a``) and fine-tunes on
B's 24 clips with the feature encoder frozen (``transfer.presets.feature_encoder_frozen``).

The transfer experiment (A, then a few clips of the unseen voice B with the feature encoder
frozen), all three rows on B's test clips, is ``colabs/speech_transfer.ipynb``. ``tiny`` and
``tiny_then`` are the test sizes.
"""

import ml_collections

from jaxfer.transfer import presets

VOICES_A = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb-x-rp", "en-029")
VOICE_B = "fr"  # French letter-to-sound rules reading English digits: an accent A never heard
SIZES = {
    "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  conv_dim=(32, 32, 32, 32), conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 4, 4),
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=8),
    "tiny": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 conv_dim=(8, 8, 8, 8), conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 4, 4),
                 num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2),
}
VOCAB = "efghinorstuvwxz"  # the letters of zero..nine
VARIANTS = ("a", "b_scratch", "a_then_b", "tiny", "tiny_then")


def scratch(size: str) -> dict:
    """wav2vec2-large's layout (layer norm in every conv, pre-norm transformer: it trains from
    scratch more readily than base's post-norm), 20 ms frames, no SpecAugment."""
    return dict(model_type="wav2vec2", vocab_size=len(VOCAB) + 2, pad_token_id=0, feat_extract_norm="layer",
                conv_bias=True, do_stable_layer_norm=True, hidden_dropout=0.1, attention_dropout=0.1,
                activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
                mask_time_prob=0.0, **SIZES[size])


def get_config(arg: str = "a"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; choose one of {VARIANTS}")
    tiny = arg.startswith("tiny")
    then = arg in ("a_then_b", "tiny_then")  # continue a trained run on voice B
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "ctc"

    c.model = ml_collections.ConfigDict()
    c.model.source = ""
    c.model.scratch = scratch("tiny" if tiny else "small")
    c.model.num_classes = len(VOCAB) + 2
    c.model.head_dropout = 0.0
    c.model.reinit = ()
    c.model.init_from = {"a_then_b": "runs/digits_a", "tiny_then": "runs/digits_tiny"}.get(arg, "")

    c.data = ml_collections.ConfigDict()
    c.data.kind = "audio"
    c.data.path = ""  # the synthesised corpus's clips.csv when empty
    c.data.synthesize = ml_collections.ConfigDict()
    voice_b = arg in ("b_scratch", "a_then_b")
    c.data.synthesize.root = "data/digits_b" if voice_b else "data/digits_tiny" if tiny else "data/digits_a"
    c.data.synthesize.voices = (VOICE_B,) if voice_b else ("en-us",) if tiny else VOICES_A
    c.data.synthesize.per_voice = 120 if voice_b else 20 if tiny else 250
    c.data.synthesize.seed = 1 if voice_b else 0
    c.data.audio = "path"
    c.data.text = "text"
    c.data.vocab = VOCAB
    c.data.sampling_rate = 16000
    c.data.max_seconds = 2.5
    c.data.max_label_length = 24
    c.data.splits = (0.2, 0.1, 0.7) if voice_b else (0.8, 0.1, 0.1)  # B: 24 clips to train, 84 to test
    c.data.batch_size = 4 if tiny else 8
    c.data.eval_batch_size = 4 if tiny else 32
    c.data.max_eval_examples = 0

    c.rules = presets.feature_encoder_frozen() if then else (("**", 1.0),)
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 5 if tiny else 30
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.layer_decay = 0.0
    c.optim.accumulate = 1

    c.train = ml_collections.ConfigDict()
    steps = 10 if tiny else 300 if voice_b else 900  # B: 24 clips, 100 epochs
    c.train.steps = steps
    c.train.epochs = 0.0  # or passes over the training data (with train.steps = 0)
    c.train.max_seconds = 0.0  # time budget: stop at a checkpoint after this long (0: none)
    c.train.eval_every = steps if tiny else 100
    c.train.log_every = 5 if tiny else 50
    c.train.checkpoint_every = c.train.eval_every
    c.train.keep = 1
    c.train.keep_best = 1
    c.train.best_metric = "wer"
    c.train.best_mode = "min"
    c.train.patience = 0
    c.train.trainable_only_checkpoints = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"
    return c
