"""Transfer methods as functions over pytrees (see each module's docstring).

* ``features``: run a frozen network once over a source and keep its outputs
  (pooled features, or any module's output), keyed by example id, in memory or
  chunked on disk; batches carrying them.
* ``probe``: linear heads on fixed features: logistic regression (L-BFGS or
  Adam), ridge, few-shot evaluation over seeds.
* ``lora``: low-rank updates of kernels chosen by path rules, for any ``apply_fn``.
"""

from jaxfer.transfer import features, lora, probe

__all__ = ["features", "lora", "probe"]
