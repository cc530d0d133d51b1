"""Transfer methods as functions over pytrees (see each module's docstring).

* ``features``: run a frozen network once over a source and keep its outputs
  (pooled features, or any module's output), keyed by example id, in memory or
  chunked on disk; ``batches``: batches carrying them, computed on first use.
* ``probe``: linear heads on fixed features: logistic regression (L-BFGS or
  Adam), ridge, few-shot evaluation over seeds.
* ``prefix``: the cached frozen prefix: find the layer boundary below which
  nothing trains (checked on the traced computation), compute its activations
  once, train the layers above on them.
* ``phases``: training in phases (LP-FT, gradual unfreezing), optimizer state
  carried over by path; ``caching``: the runner's choice of what to compute once.
* ``lora``: low-rank updates of kernels chosen by path rules, for any ``apply_fn``.
* ``adapters``: bottleneck adapters on chosen modules' outputs (Houlsby, Pfeiffer), through
  ``nn.intercept_methods``, no model code edited.
* ``presets``: named rules (BitFit, LayerNorm tuning, LoRA, adapters).
* ``regularizers``: L2-SP (an optax transformation), BSS and distillation / LwF (loss terms).
* ``select``: transferability scores (LogME, LEEP, NCE, H-score, TransRate) to
  choose a pretrained model before training it.
* ``multitask``: several heads on one backbone: the combined loss (fixed or
  uncertainty weights) and per-task metrics.
* ``adapt``: domain adaptation terms (gradient reversal, DANN, CDAN(+E), CORAL,
  MK-MMD, MCC) and AdaBN.
"""

from jaxfer.transfer import (adapt, adapters, batches, caching, features, lora, multitask, phases, prefix,
                             presets, probe, regularizers, select)

__all__ = ["adapt", "adapters", "batches", "caching", "features", "lora", "multitask", "phases", "prefix",
           "presets", "probe", "regularizers", "select"]
