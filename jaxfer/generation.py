"""Text generation under ``jit`` with a key/value cache: greedy, sampling, beam search.

    out = generate(model, input_ids, attention_mask, max_new_tokens=20)               # greedy
    out = generate(model, ids, mask, max_new_tokens=20, strategy="sample", temperature=0.7, top_p=0.9, rng=0)
    out = generate(model, ids, mask, max_new_tokens=20, strategy="beam", num_beams=4)
    out["tokens"]      # (B, max_new_tokens) new token ids; after a row's EOS: pad_token_id
    tokenizer.batch_decode(out["tokens"], skip_special_tokens=True)

``model`` is a loaded :class:`jaxfer.weights.load.Model` (or a Linen module, with
``params=``) of a generative family:

* decoder-only (GPT-2): ``module(input_ids, attention_mask, position_ids, cache=...)``
  returns ``logits`` and the new ``cache``; ``module.init_cache(batch, length)``;
* encoder-decoder (T5): ``module.encode(input_ids, attention_mask)``, ``module.decode(
  decoder_input_ids, encoder_hidden_states, attention_mask, cache=...)``, ``init_cache``.

Fixed shapes: the prompt ``(B, P)`` and ``max_new_tokens`` fix every array, the cache
is allocated once for ``P + max_new_tokens`` slots, and the whole loop is one jitted
``lax.while_loop`` (it stops early once every row has ended). So a generation
compiles once per model, batch shape and settings, and never per token; later
calls with new prompts of the same shape reuse the compiled loop.

Semantics follow ``transformers``' ``generate`` (the tests compare token for token):
prompts of a decoder-only model may be padded on either side (rows are moved to
the left, positions count real tokens only); a row that produced EOS continues
with ``pad_token_id``; sampling applies temperature, then top-k, then top-p; beam
search keeps ``num_beams`` running and finished hypotheses, scores finished ones by
``sum log p / length ** length_penalty`` and stops as HF's heuristic does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("greedy", "sample", "beam")
NEG = -1.0e9  # HF's "impossible" score


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a generation does; hashable, one compiled loop per distinct value."""

    max_new_tokens: int
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = False
    eos_token_id: int | None = None
    pad_token_id: int = 0
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.strategy == "sample" and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.strategy == "beam" and self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def settings_for(config: Any, max_new_tokens: int, **kw) -> Settings:
    """:class:`Settings` with EOS / pad / decoder-start ids from the model's HF config
    where not given (pad defaults to EOS when the config has none, as in HF)."""
    eos = kw.pop("eos_token_id", None)
    eos = _get(config, "eos_token_id") if eos is None else eos
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"one eos_token_id is supported, got {eos}")
        eos = eos[0]
    pad = kw.pop("pad_token_id", None)
    pad = _get(config, "pad_token_id", eos if eos is not None else 0) if pad is None else pad
    start = kw.pop("decoder_start_token_id", None)
    start = _get(config, "decoder_start_token_id", pad) if start is None else start
    return Settings(max_new_tokens, eos_token_id=None if eos is None else int(eos), pad_token_id=int(pad),
                    decoder_start_token_id=int(start), **kw)


# -------------------------------------------------------- the model, stepped
def _left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each row's trailing padding to the front (a decoder-only prompt must end
    with its last real token)."""
    p = ids.shape[1]
    last = jnp.max(jnp.where(mask > 0, jnp.arange(p), -1), axis=1)
    shift = p - 1 - last
    roll = jax.vmap(lambda row, s: jnp.roll(row, s))
    return roll(ids, shift), roll(mask, shift)


def _is_encoder_decoder(module: nn.Module) -> bool:
    return hasattr(module, "encode") and hasattr(module, "decode")


def _stepper(module: nn.Module, s: Settings, rows: int) -> tuple[Callable, Callable]:
    """``(start, step)``: ``start(params, ids, mask) -> (logits, carry)`` runs the prompt
    (``rows`` copies of each prompt row: beams); ``step(params, token, i, carry) ->
    (logits, carry)`` feeds new token ``i``. ``carry`` holds the cache."""
    n = s.max_new_tokens
    if _is_encoder_decoder(module):
        def start(params, ids, mask):
            ids, mask = (jnp.repeat(x, rows, axis=0) for x in (ids, mask))
            enc = module.apply({"params": params}, ids, mask, method="encode")["last_hidden_state"]
            cache = module.init_cache(ids.shape[0], n + 1)  # start token + every fed token
            first = jnp.full((ids.shape[0], 1), s.decoder_start_token_id, jnp.int32)
            out = module.apply({"params": params}, first, enc, mask, cache=cache, method="decode")
            return out["logits"][:, -1], {"cache": out["cache"], "enc": enc, "mask": mask}

        def step(params, token, i, carry):
            out = module.apply({"params": params}, token[:, None], carry["enc"], carry["mask"],
                               cache=carry["cache"], method="decode")
            return out["logits"][:, -1], {**carry, "cache": out["cache"]}

        return start, step

    def start(params, ids, mask):
        ids, mask = _left_align(ids, mask)
        ids, mask = (jnp.repeat(x, rows, axis=0) for x in (ids, mask))
        b, p = ids.shape
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        slots = jnp.concatenate([mask, jnp.ones((b, n), mask.dtype)], axis=1)
        out = module.apply({"params": params}, ids, slots, positions, cache=module.init_cache(b, p + n))
        return out["logits"][:, -1], {"cache": out["cache"], "slots": slots, "next": positions[:, -1] + 1}

    def step(params, token, i, carry):
        positions = (carry["next"] + i)[:, None]
        out = module.apply({"params": params}, token[:, None], carry["slots"], positions, cache=carry["cache"])
        return out["logits"][:, -1], {**carry, "cache": out["cache"]}

    return start, step


# ------------------------------------------------------------ choosing tokens
def _warp(logits: jax.Array, s: Settings) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus), as HF's logits warpers."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as HF
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cum <= 1.0 - s.top_p
        drop_sorted = drop_sorted.at[..., -1].set(False)  # keep at least the best token
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


def _search(module: nn.Module, s: Settings) -> Callable:
    """Greedy or sampled decoding: ``fn(params, ids, mask, rng) -> {"tokens"}``."""
    start, step = _stepper(module, s, 1)
    n, pad = s.max_new_tokens, s.pad_token_id
    eos = -1 if s.eos_token_id is None else s.eos_token_id

    def fn(params, ids, mask, rng):
        logits, carry = start(params, ids, mask)
        b = logits.shape[0]

        def cond(state):
            return (state["i"] < n) & ~jnp.all(state["done"])

        def body(state):
            rng, sub = jax.random.split(state["rng"])
            logits = state["logits"].astype(jnp.float32)
            if s.strategy == "sample":
                token = jax.random.categorical(sub, _warp(logits, s), axis=-1)
            else:
                token = jnp.argmax(logits, axis=-1)
            token = jnp.where(state["done"], pad, token).astype(jnp.int32)
            tokens = state["tokens"].at[:, state["i"]].set(token)
            done = state["done"] | (token == eos)
            logits, carry = step(params, token, state["i"], state["carry"])
            return {"i": state["i"] + 1, "tokens": tokens, "done": done, "logits": logits, "carry": carry,
                    "rng": rng}

        state = {"i": jnp.asarray(0, jnp.int32), "tokens": jnp.full((b, n), pad, jnp.int32),
                 "done": jnp.zeros((b,), bool), "logits": logits, "carry": carry, "rng": rng}
        return {"tokens": jax.lax.while_loop(cond, body, state)["tokens"]}

    return fn


def _beam(module: nn.Module, s: Settings) -> Callable:
    """Beam search as HF's (vectorised, fixed shapes): ``fn(params, ids, mask, rng) ->
    {"tokens", "scores"}`` with the best finished hypothesis of each row."""
    k, n, pad = s.num_beams, s.max_new_tokens, s.pad_token_id
    eos = -1 if s.eos_token_id is None else s.eos_token_id
    keep = 2 * k  # candidates per step: enough that k stay open when k of them end
    start, step = _stepper(module, s, k)
    lp = s.length_penalty

    def gather(x, idx):  # x (B, m, ...), idx (B, j) -> (B, j, ...)
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def fn(params, ids, mask, rng):
        logits, carry = start(params, ids, mask)
        b = logits.shape[0] // k
        vocab = logits.shape[-1]

        def cond(st):
            return (st["i"] < n) & jnp.any(st["open"]) & ~(s.early_stopping & jnp.all(st["finished"]))

        def body(st):
            i = st["i"]
            logp = jax.nn.log_softmax(st["logits"].astype(jnp.float32), axis=-1).reshape(b, k, vocab)
            logp = (logp + st["run_scores"][:, :, None]).reshape(b, k * vocab)
            top_scores, top_idx = jax.lax.top_k(logp, keep)
            origin = top_idx // vocab
            token = (top_idx % vocab).astype(jnp.int32)
            cand = gather(st["run_seqs"], origin).at[:, :, i].set(token)
            hits = (token == eos) | (i == n - 1)  # EOS, or the length limit
            # the k best candidates that did not end continue
            run_scores, nxt = jax.lax.top_k(top_scores + hits * NEG, k)
            run_seqs = gather(cand, nxt)
            beam_origin = gather(origin, nxt) + (jnp.arange(b) * k)[:, None]
            # ended candidates among the top k enter the finished set, length-normalised
            just = hits & (jnp.arange(keep) < k)[None]
            fin_scores = top_scores / ((i + 1).astype(jnp.float32) ** lp)
            full = jnp.all(st["finished"], axis=1, keepdims=True) & s.early_stopping
            fin_scores = fin_scores + full * NEG + (~st["open"]) * NEG + (~just) * NEG
            merged = jnp.concatenate([st["scores"], fin_scores], axis=1)
            best, pick = jax.lax.top_k(merged, k)
            seqs = gather(jnp.concatenate([st["seqs"], cand], axis=1), pick)
            finished = gather(jnp.concatenate([st["finished"], just], axis=1), pick)
            # reorder the cache by the beams' origins, then feed the new tokens
            flat = beam_origin.reshape(-1)
            carry = jax.tree_util.tree_map(
                lambda x: x[flat] if x.ndim and x.shape[0] == b * k else x, st["carry"])
            logits, carry = step(params, run_seqs[:, :, i].reshape(-1), i, carry)
            # can a running beam still beat the worst finished one? (HF's heuristic)
            best_running = run_scores[:, :1] / ((i + 1).astype(jnp.float32) ** lp)
            worst = jnp.where(finished, jnp.min(best, axis=1, keepdims=True), NEG)
            still = st["open"] & jnp.any(best_running > worst, axis=1, keepdims=True)
            return {"i": i + 1, "logits": logits, "carry": carry, "run_seqs": run_seqs, "run_scores": run_scores,
                    "seqs": seqs, "scores": best, "finished": finished, "open": still}

        st = {"i": jnp.asarray(0, jnp.int32), "logits": logits, "carry": carry,
              "run_seqs": jnp.full((b, k, n), pad, jnp.int32),
              "run_scores": jnp.tile(jnp.asarray([0.0] + [NEG] * (k - 1), jnp.float32), (b, 1)),
              "seqs": jnp.full((b, k, n), pad, jnp.int32), "scores": jnp.full((b, k), NEG, jnp.float32),
              "finished": jnp.zeros((b, k), bool), "open": jnp.ones((b, 1), bool)}
        st = jax.lax.while_loop(cond, body, st)
        return {"tokens": st["seqs"][:, 0], "scores": st["scores"][:, 0]}

    return fn


# --------------------------------------------------------------- public face
_COMPILED: dict[tuple[int, Settings], tuple[nn.Module, Callable]] = {}


def compiled(module: nn.Module, settings: Settings) -> Callable:
    """The jitted ``fn(params, input_ids, attention_mask, rng) -> dict`` for ``module`` and
    ``settings``, built once and reused (its compilations are per input shape)."""
    key = (id(module), settings)
    if key not in _COMPILED:
        if settings.strategy == "beam" and settings.num_beams > 1:
            fn = _beam(module, settings)
        else:
            fn = _search(module, settings)
        _COMPILED[key] = (module, jax.jit(fn))
    return _COMPILED[key][1]


def generate(model: Any, input_ids, attention_mask=None, *, params: Any = None, max_new_tokens: int = 20,
             strategy: str = "greedy", rng: jax.Array | int = 0, **settings: Any) -> dict[str, np.ndarray]:
    """Generate up to ``max_new_tokens`` tokens after each prompt row (see the module docstring).

    Args:
      model: a loaded ``Model`` of a generative family, or its Linen module (then give ``params``).
      input_ids, attention_mask: the prompts ``(B, P)`` (encoder inputs for T5).
      params: the params to use (default: the model's own, e.g. pass ``state.params``).
      strategy: ``"greedy"``, ``"sample"`` or ``"beam"``.
      rng: key or seed for sampling.
      settings: :class:`Settings` fields (``temperature``, ``top_k``, ``top_p``,
        ``num_beams``, ``length_penalty``, ``early_stopping``, ``eos_token_id``,
        ``pad_token_id``, ``decoder_start_token_id``); token ids default to the config's.

    Returns numpy ``{"tokens": (B, max_new_tokens)}`` (plus ``"scores"``, the length-normalised
    log-probability of each row's hypothesis, for beam search).
    """
    module = getattr(model, "module", model)
    config = getattr(model, "config", None) or module.config
    if params is None:
        if not hasattr(model, "params"):
            raise ValueError("generate got a bare module: pass params=")
        params = model.params
    params = params["params"] if "params" in params else params
    if not (_is_encoder_decoder(module) or hasattr(module, "init_cache")):
        raise TypeError(f"{type(module).__name__} cannot generate: it has no key/value cache "
                        "(generative families: gpt2, t5; a model with a classifier head is not one)")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match input_ids {input_ids.shape}")
    s = settings_for(config, max_new_tokens, strategy=strategy, **settings)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    out = compiled(module, s)(params, input_ids, mask, key)
    return {k: np.asarray(v) for k, v in out.items()}
