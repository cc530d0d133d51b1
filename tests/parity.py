"""Shared helpers of the per-family parity tests (ours vs the torch reference, CPU, float32).

A family's test converts a reference model's state dict with the family's
``convert``, checks the converted layout is exactly what ``init`` builds
(:func:`assert_same_layout`), then compares outputs with :func:`maxdiff` <= ``TOL``.
"""

import jax
import numpy as np

from jaxfer import tree

TOL = 1e-4  # max abs diff, float32


def numpy_state_dict(model) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy copies (no aliasing of torch storage)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def variables(flat: dict[str, dict[str, np.ndarray]]) -> dict:
    """``{collection: {path: array}}`` (a family's ``convert`` output) -> nested variables."""
    return {c: tree.unflatten(vs) for c, vs in flat.items()}


def torch_out(model, *args, **kwargs):
    """``model(*args, **kwargs)`` under ``torch.no_grad()``, numpy arrays turned into tensors."""
    import torch

    t = lambda v: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
    with torch.no_grad():
        return model(*map(t, args), **{k: t(v) for k, v in kwargs.items()})


def maxdiff(ours, ref, mask=None) -> float:
    """Max abs difference of our array and a torch tensor of the same shape; with ``mask``
    (``(B, T)``, 1 = real token) only over the unmasked positions (padding carries no meaning)."""
    a, b = np.asarray(ours), ref.detach().numpy()
    assert a.shape == b.shape, (a.shape, b.shape)
    if mask is not None:
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    return float(np.abs(a - b).max())


def assert_same_layout(module, inputs: dict, flat: dict[str, dict[str, np.ndarray]]) -> None:
    """Every collection of ``module.init(**inputs)`` has exactly the paths and shapes of ``flat``."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), **inputs))
    assert set(abstract) == set(flat), (set(abstract), set(flat))
    for coll in flat:
        want = {p: v.shape for p, v in tree.flatten(abstract[coll]).items()}
        assert want == {p: v.shape for p, v in flat[coll].items()}, coll
