"""ViT-B/16 (ImageNet-21k) fine-tuned on CIFAR-10 from tensorflow-datasets.

The kind of run people take to a TPU pod slice or a multi-GPU machine::

    # one machine, every local device (data parallel)
    jaxfer train --config configs/vit_cifar10.py --workdir gs://bucket/runs/vit

    # TPU pod slice: the same command on every host (jax.distributed is
    # auto-detected), parameters and optimizer state sharded (FSDP)
    jaxfer train --config configs/vit_cifar10.py:pod --workdir gs://bucket/runs/vit

Needs ``pip install 'jaxfer[tfds]'`` (tfds + TensorFlow to prepare cifar10 once)
and network access for the weights and the dataset. Variants after the colon:
``full`` (default), ``probe`` (frozen backbone, new head), ``pod`` (full, FSDP
over all devices, bigger batch), ``scratch`` (``full`` from a random
initialisation: what the pretrained weights are worth).
"""

import ml_collections

HUB_ID = "google/vit-base-patch16-224-in21k"


def get_config(arg: str = "full"):
    if arg not in ("full", "probe", "pod", "scratch"):
        raise ValueError(f"unknown variant {arg!r}; choose full, probe, pod or scratch")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"

    c.model = ml_collections.ConfigDict()
    c.model.source = HUB_ID
    c.model.num_classes = 10
    c.model.pooling = "cls"
    c.model.reinit = ("**",) if arg == "scratch" else ()  # scratch: no pretrained weight is kept

    c.data = ml_collections.ConfigDict()
    c.data.kind = "tfds"
    c.data.name = "cifar10"
    c.data.data_dir = ""  # tfds default
    c.data.download = True
    c.data.splits = ("train[:98%]", "train[98%:]", "test")  # train / validation / test
    c.data.image_size = 224
    c.data.image_options = {"augment": "imagenet"}  # resize/mean/std: the checkpoint's preprocessor_config.json
    c.data.mixup_alpha = 0.0
    c.data.batch_size = 512 if arg == "pod" else 64
    c.data.eval_batch_size = 512 if arg == "pod" else 128
    c.data.max_eval_examples = 0

    c.rules = ((("classifier/**", 1.0), ("**", None)) if arg == "probe" else (("**", 1.0),))
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd" if arg != "probe" else "adamw"
    c.optim.lr = 0.03 if arg != "probe" else 1e-3
    c.optim.schedule = "warmup_cosine"
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.layer_decay = 0.0
    c.optim.accumulate = 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 2000
    c.train.epochs = 0.0
    c.train.max_seconds = 0.0
    c.train.eval_every = 500
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    c.train.keep = 2
    c.train.keep_best = 1
    c.train.best_metric = "accuracy"
    c.train.patience = 0
    c.train.max_nonfinite_skips = 5  # non-finite steps skipped in a row before the run stops
    c.train.compute_dtype = ""  # "bfloat16": mixed precision, float32 master weights
    c.train.dropout_rng = "hash"  # dropout masks from a counter hash (jaxfer.train.rng); "threefry": JAX's generator
    c.train.frozen_dtype = ""  # "bfloat16": frozen weights stored in half the memory
    c.train.compilation_cache = ""  # e.g. "~/.cache/jaxfer/xla": reruns skip XLA compiles
    c.train.strict_resume = False  # True: an unreadable latest checkpoint stops the run
    c.train.trainable_only_checkpoints = arg == "probe"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.strategy = "jit"
    if arg == "pod":  # every device holds 1/N of each large leaf; batch over all devices
        c.mesh.data = 1
        c.mesh.fsdp = -1
    return c
