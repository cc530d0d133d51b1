"""Transfer methods as functions over pytrees (see each module's docstring).

``lora``: low-rank updates of kernels chosen by path rules, for any ``apply_fn``.
"""

from jaxfer.transfer import lora

__all__ = ["lora"]
