"""The models the step benchmark compares, each built twice: jaxfer's and the PyTorch way's.

A :class:`Case` holds, for one family at one size, the jaxfer task model and a
batch, which parameter paths each mode trains, and a function that builds the
PyTorch reference (``transformers`` / ``torchvision`` / ``efficientnet_lite_pytorch``,
the same architecture and size) with the same modes expressed as
``requires_grad_(False)`` on modules. Weights are random (speed does not depend
on them); inputs are random token ids or normalised pixels.

Modes (``MODES``):

* ``full`` -- everything trains;
* ``top2`` -- the top two of the family's layers (BERT/ViT encoder layers,
  ResNet stages, EfficientNet stages) and everything above them (pooler, final
  norm, head conv, classifier); below is frozen;
* ``head`` -- only the classifier (a linear probe);
* ``lora`` -- rank-8 LoRA (alpha 16) on the attention query/value kernels plus
  the classifier (jaxfer: :mod:`jaxfer.transfer.lora`; PyTorch: ``peft``);
  transformer families only;
* ``prefix`` -- ``top2`` where jaxfer runs the step on the cached output of the
  frozen bottom (:mod:`jaxfer.transfer.prefix`); the PyTorch way has no such
  cache, so its column is its ``top2`` step (the frozen bottom runs every step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np

from jaxfer.models.bert import BertModel
from jaxfer.models.heads import Classifier, TaskModel

MODES = ("full", "top2", "head", "lora", "prefix")


@dataclasses.dataclass
class Case:
    name: str
    label: str                 # size, for the table's title
    model: nn.Module           # jaxfer TaskModel
    batch: dict                # numpy, with "label" and "mask"
    layer_pattern: str         # regex, group 1 = layer index (the family's)
    num_layers: int
    above: tuple[str, ...]     # path globs above the layer stack (pooler, final norm, head...)
    lora_targets: str | None   # glob of the kernels LoRA adapts (None: no LoRA row)
    torch: Callable[[], "TorchCase"]
    init_inputs: dict = dataclasses.field(default_factory=dict)

    @property
    def examples(self) -> int:
        return len(self.batch["label"])

    def rules(self, mode: str) -> list[tuple[str, Any]]:
        """jaxfer rules (first match wins; ``None`` = frozen) for a mode."""
        if mode == "full":
            return [("**", 1.0)]
        if mode == "head":
            return [("classifier/**", 1.0), ("**", None)]
        if mode in ("top2", "prefix"):
            # one rule per layer: a glob class such as "[1011]" would match layers 0, 1, 10 and 11
            top = [self.layer_pattern.replace(r"(\d+)", str(i)).rstrip("/") + "/**"
                   for i in (self.num_layers - 2, self.num_layers - 1)]
            return [*[(g, 1.0) for g in top], *[(g, 1.0) for g in self.above], ("**", None)]
        if mode == "lora":
            return [("lora/**", 1.0), ("classifier/**", 1.0), ("**", None)]
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


@dataclasses.dataclass
class TorchCase:
    model: Any                       # torch.nn.Module, in train mode
    inputs: dict                     # keyword inputs (torch tensors)
    labels: Any
    blocks: list                     # the family's layers, bottom to top
    above: list                      # modules above the layers (trainable in top2)
    head: list                       # the classifier module(s)
    lora_targets: list[str] | None   # peft target_modules
    loss: Callable[[Any, Any], Any]  # (model outputs, labels) -> loss


def _cross_entropy(out, labels):
    import torch

    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits, labels)


def _torch_tensors(batch: dict, keys, long: bool):
    import torch

    return {k: (torch.from_numpy(batch[k]).long() if long else torch.from_numpy(batch[k])) for k in keys}


# ---------------------------------------------------------------------- BERT
def bert(batch_size: int = 32, seq: int = 64, hidden: int = 384, layers: int = 6, heads: int = 12,
         vocab: int = 30522, classes: int = 3, dropout: float = 0.1) -> Case:
    """MiniLM-size by default (all-MiniLM-L6-v2: hidden 384, 6 layers, 12 heads)."""
    config = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, max_position_embeddings=max(512, seq), type_vocab_size=2,
                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, hidden_act="gelu",
                  layer_norm_eps=1e-12, initializer_range=0.02)
    r = np.random.default_rng(0)
    ids = r.integers(0, vocab, size=(batch_size, seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "label": r.integers(0, classes, size=batch_size).astype(np.int32),
             "mask": np.ones(batch_size, np.float32)}
    model = TaskModel(BertModel(config), Classifier(classes, pooling="pooler", dropout_rate=dropout))

    def torch_case() -> TorchCase:
        import transformers

        m = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=classes, **config))
        return TorchCase(m.train(), _torch_tensors(batch, ("input_ids", "attention_mask", "token_type_ids"), True),
                         _torch_tensors(batch, ("label",), True)["label"], list(m.bert.encoder.layer),
                         [m.bert.pooler], [m.classifier], ["query", "value"], _cross_entropy)

    return Case("bert", f"BERT h{hidden} L{layers} A{heads}, batch {batch_size} x {seq} tokens", model, batch,
                r"bert/encoder/layer/(\d+)/", layers, ("bert/pooler/**", "classifier/**"),
                "re:.*/attention/self/(query|value)/kernel", torch_case,
                {k: batch[k][:1] for k in ("input_ids", "attention_mask")})


# ----------------------------------------------------------------------- ViT
def vit(batch_size: int = 16, image: int = 224, patch: int = 16, hidden: int = 384, layers: int = 12,
        heads: int = 6, classes: int = 10) -> Case:
    """ViT-S/16 by default (hidden 384, 12 layers, 6 heads, 224 px: 197 tokens)."""
    from jaxfer.models.vit import ViTModel

    config = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=4 * hidden, image_size=image, patch_size=patch, hidden_act="gelu",
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    batch = _images(batch_size, image, classes)
    model = TaskModel(ViTModel(config, add_pooling_layer=False), Classifier(classes, pooling="cls"), prefix="vit")

    def torch_case() -> TorchCase:
        import transformers

        m = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=classes, **config))
        # transformers >= 5.2x: vit.layers[i].attention.{q,k,v,o}_proj; before: vit.encoder.layer[i]...query
        layer = m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer
        targets = ["q_proj", "v_proj"] if hasattr(layer[0].attention, "q_proj") else ["query", "value"]
        return TorchCase(m.train(), _torch_tensors(batch, ("pixel_values",), False),
                         _torch_tensors(batch, ("label",), True)["label"], list(layer), [m.vit.layernorm],
                         [m.classifier], targets, _cross_entropy)

    return Case("vit", f"ViT h{hidden} L{layers} A{heads} /{patch}, batch {batch_size} x {image}px", model,
                batch, r"vit/encoder/layer/(\d+)/", layers, ("vit/layernorm/**", "classifier/**"),
                "re:.*/attention/attention/(query|value)/kernel", torch_case,
                {"pixel_values": batch["pixel_values"][:1]})


def _images(batch_size: int, image: int, classes: int) -> dict:
    r = np.random.default_rng(0)
    return {"pixel_values": r.standard_normal((batch_size, 3, image, image)).astype(np.float32),
            "label": r.integers(0, classes, size=batch_size).astype(np.int32),
            "mask": np.ones(batch_size, np.float32)}


# -------------------------------------------------------------------- ResNet
def resnet(batch_size: int = 16, image: int = 224, depths=(3, 4, 6, 3), classes: int = 10) -> Case:
    """ResNet-50 by default (bottleneck, depths 3-4-6-3); torchvision's ``resnet50`` is the reference."""
    from jaxfer.models.resnet import ResNetModel

    config = dict(depths=tuple(depths), hidden_sizes=(256, 512, 1024, 2048), embedding_size=64,
                  layer_type="bottleneck")
    batch = _images(batch_size, image, classes)
    model = TaskModel(ResNetModel(config), Classifier(classes, pooling="pooler"), prefix="resnet")

    def torch_case() -> TorchCase:
        import torch
        import torchvision

        m = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, list(depths), num_classes=classes)
        return TorchCase(m.train(), {"x": torch.from_numpy(batch["pixel_values"])},
                         _torch_tensors(batch, ("label",), True)["label"], [m.layer1, m.layer2, m.layer3, m.layer4],
                         [], [m.fc], None, _cross_entropy)

    name = "ResNet-50" if tuple(depths) == (3, 4, 6, 3) else f"ResNet depths {tuple(depths)}"
    return Case("resnet", f"{name}, batch {batch_size} x {image}px", model, batch,
                r"resnet/encoder/stages/(\d+)/", len(depths), ("classifier/**",), None, torch_case,
                {"pixel_values": batch["pixel_values"][:1]})


# -------------------------------------------------------------- EfficientNet
def efficientnet(batch_size: int = 16, image: int = 224, classes: int = 10, variant: str = "lite0") -> Case:
    """EfficientNet-Lite0 by default; ``efficientnet_lite_pytorch`` is the reference."""
    from jaxfer.models import efficientnet as eff

    config = {"model_type": eff.MODEL_TYPE, "variant": variant}
    batch = _images(batch_size, image, classes)
    dropout = eff.resolve(config)["dropout_rate"]
    model = TaskModel(eff.build(config), Classifier(classes, pooling="pooler", dropout_rate=dropout),
                      prefix="efficientnet")
    stage_sizes = [s["repeats"] for s in eff.stages(config)]

    def torch_case() -> TorchCase:
        import efficientnet_lite_pytorch

        m = efficientnet_lite_pytorch.EfficientNet.from_name(f"efficientnet-{variant}", num_classes=classes)
        starts = np.cumsum([0] + stage_sizes)
        stages = [[m._blocks[i] for i in range(starts[s], starts[s + 1])] for s in range(len(stage_sizes))]
        return TorchCase(m.train(), {"inputs": __import__("torch").from_numpy(batch["pixel_values"])},
                         _torch_tensors(batch, ("label",), True)["label"], stages, [m._conv_head, m._bn1],
                         [m._fc], None, _cross_entropy)

    return Case("efficientnet", f"EfficientNet-{variant.capitalize()}, batch {batch_size} x {image}px", model,
                batch, r"efficientnet/blocks/(\d+)/", len(stage_sizes), ("efficientnet/top/**", "classifier/**"),
                None, torch_case, {"pixel_values": batch["pixel_values"][:1]})


FAMILIES = {"bert": bert, "vit": vit, "resnet": resnet, "efficientnet": efficientnet}
