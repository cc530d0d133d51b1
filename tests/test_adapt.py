"""Domain adaptation terms: known answers (reversal gradient, zero distances, AdaBN statistics)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfer.models.common import DropPath
from jaxfer.train.step import linen_apply
from jaxfer.transfer import adapt

RNG = np.random.default_rng(0)


def test_reversal_gradient_is_exactly_minus_lambda_times_upstream():
    x = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    upstream = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    lam = jnp.float32(0.37)
    value, grad = jax.value_and_grad(lambda x: jnp.sum(adapt.gradient_reversal(x, lam) * upstream))(x)
    np.testing.assert_array_equal(grad, -lam * upstream)
    np.testing.assert_array_equal(value, jnp.sum(x * upstream))  # identity forward
    # through a discriminator: the features get -lam times the plain gradient (lam = -1 is
    # the identity), the discriminator's own parameters the plain gradient
    disc = adapt.DomainDiscriminator(hidden=8, layers=1)
    params = disc.init(jax.random.key(0), x)
    grad = jax.grad(lambda p, x, lam: jnp.sum(disc.apply(p, x, lam) ** 2), argnums=(0, 1))
    (g_params, g_x), (g_params_plain, g_x_plain) = grad(params, x, 0.5), grad(params, x, -1.0)
    np.testing.assert_allclose(g_x, -0.5 * g_x_plain, rtol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, g_params, g_params_plain)


def test_dann_lambda_schedule():
    np.testing.assert_allclose(adapt.dann_lambda(0.0), 0.0)
    np.testing.assert_allclose(adapt.dann_lambda(1.0), 2 / (1 + np.exp(-10)) - 1, rtol=1e-6)
    assert 0 < float(adapt.dann_lambda(0.1)) < float(adapt.dann_lambda(0.5)) < 1


def test_coral_and_mmd_of_identical_distributions_are_zero():
    f = RNG.normal(size=(6, 5)).astype(np.float32)
    both = np.concatenate([f, f])
    domain = np.array([0] * 6 + [1] * 6)
    assert abs(float(adapt.coral(both, domain))) < 1e-10
    assert abs(float(adapt.mk_mmd(both, domain))) < 1e-6
    shifted = np.concatenate([f, 3 * f + 1])
    assert float(adapt.coral(shifted, domain)) > 1e-2 and float(adapt.mk_mmd(shifted, domain)) > 1e-2
    # CORAL against numpy: unbiased covariances, |Cs - Ct|^2 / (4 d^2); padding rows are ignored
    ref = np.sum((np.cov(f, rowvar=False) - np.cov(3 * f + 1, rowvar=False)) ** 2) / (4 * 25)
    padded = np.concatenate([shifted, RNG.normal(size=(2, 5))])
    mask = np.array([1] * 12 + [0, 0])
    np.testing.assert_allclose(adapt.coral(padded, np.r_[domain, 1, 0], mask=mask), ref, rtol=1e-5)


def test_adversarial_loss_cdan_maps_and_mcc():
    logits = np.array([10.0, -10.0, 0.0, 0.0], np.float32)
    domain = np.array([0, 1, 0, 1])
    # a discriminator right on rows 0/1 and unsure on rows 2/3: each domain's mean is log(2)/2
    np.testing.assert_allclose(adapt.domain_adversarial_loss(logits, domain),
                               0.5 * (np.log1p(np.exp(-10)) + np.log(2)), rtol=1e-5)
    f, g = RNG.normal(size=(3, 4)), np.eye(3)[[0, 2, 1]]
    np.testing.assert_allclose(adapt.multilinear_map(f, g), np.einsum("bi,bj->bij", f, g).reshape(3, -1))
    assert float(adapt.mcc(np.eye(3)[[0, 1, 2, 1]] * 100.0)) < 1e-6           # one-hot: no confusion
    assert float(adapt.mcc(np.zeros((4, 3)))) > 0.5                          # uniform: all confusion
    w = adapt.entropy_weights(np.array([[1.0, 0.0], [0.5, 0.5]]))
    np.testing.assert_allclose(w, [2.0, 1.5], rtol=1e-6)


class _BN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(x)


def test_adabn_statistics_are_the_target_data_statistics():
    module = _BN()
    x = RNG.normal(size=(12, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x)
    target = (2.0 * x + 5.0).astype(np.float32)
    batches = [{"x": target[:6]}, {"x": target[6:]}]
    stats = adapt.adabn(linen_apply(module), variables, batches)["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], target.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], (target[:6].var(0) + target[6:].var(0)) / 2, rtol=1e-5)
    # the module's own momentum and mode are untouched afterwards
    _, new = linen_apply(module)(variables, {"x": target[:6]}, train=True)
    np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"], 0.1 * target[:6].mean(0), rtol=1e-5)


class _DroppedBN(nn.Module):
    """Dropout and stochastic depth before a batch norm (EfficientNet's blocks have both)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = DropPath(0.5)(nn.Dropout(0.5)(x, deterministic=not train), deterministic=not train)
        return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(x))


def test_adabn_switches_dropout_and_stochastic_depth_off():
    module = _DroppedBN()
    x = RNG.normal(size=(16, 3)).astype(np.float32)
    variables = module.init(jax.random.key(0), x)
    stats = adapt.adabn(linen_apply(module), variables, [{"x": x}])["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-5)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
        return {"last_hidden_state": nn.relu(h)[:, None, :]}


def test_domain_classifier_trains_on_source_and_target_batches_and_counts_its_schedule():
    import jaxfer as jf
    from jaxfer.data import mixture
    from jaxfer.models import heads
    from jaxfer.transfer import regularizers

    n = 32
    x = RNG.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    source = jf.data.from_arrays({"x": x, "label": y})
    target = jf.data.from_arrays({"x": 2 * x + 1, "label": y})
    train = mixture.Mixture({"s": jf.data.pipeline(source, global_batch_size=8, train=True),
                             "t": jf.data.pipeline(target, global_batch_size=8, train=True)},
                            part_key="domain", hide={"t": ("label",)})
    batch = next(train)
    assert (batch["label"][8:] == -100).all() and (batch["domain"] == np.repeat([0, 1], 8)).all()
    head = adapt.DomainClassifier(2, pooling="cls", method="cdan+e", hidden=8, total_calls=6)
    model = heads.TaskModel(_Net(), head, prefix="net")
    variables = model.init(jax.random.key(0), x[:2])
    assert set(variables) == {"params", "batch_stats", "adapt"}
    base = jf.losses.for_task("classification")
    loss = regularizers.add_terms(base, (1.0, adapt.term("cdan+e")))
    apply_fn = jf.linen_apply(model, input_keys=("x",))
    tx = optax.adam(1e-2)
    step = jf.make_train_step(apply_fn, loss, tx, micro_batches=2)
    state = jf.TrainState.create(variables["params"], tx, rng=0,
                                 model_state={k: v for k, v in variables.items() if k != "params"})
    before = jax.tree_util.tree_map(np.array, state.params["classifier"]["discriminator"])
    state, metrics = step(state, batch)
    state, metrics = step(state, next(train))
    assert int(state.model_state["adapt"]["classifier"]["calls"]) == 4  # 2 steps x 2 micro-batches
    changed = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()), before,
                                     state.params["classifier"]["discriminator"])
    assert all(jax.tree_util.tree_leaves(changed))
    outputs, _ = apply_fn({"params": state.params, **state.model_state}, batch, train=False)
    assert outputs["domain_logits"].shape == (16,) and outputs["features"].shape == (16, 8)
    # evaluation batches have no domain column: the term is 0 and the loss is the plain one
    plain = {k: v for k, v in batch.items() if k != "domain"}
    np.testing.assert_array_equal(loss(outputs, plain)[0], base(outputs, plain)[0])
    assert float(jnp.sum(loss(outputs, batch)[0] - base(outputs, batch)[0])) != 0.0
