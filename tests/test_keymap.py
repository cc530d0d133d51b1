import numpy as np
import pytest

from jaxfer.models.keymap import (TRANSFORMS, KeyRule, Transform, apply_key_map, batch_norm, conv, generic_rules,
                                  strip_prefix)

RULES = [
    KeyRule(r"emb\.weight", "emb/embedding", "embedding"),
    KeyRule(r"(.*)\.LayerNorm\.(?:weight|gamma)", r"\1/LayerNorm/scale", "norm_scale"),
    KeyRule(r"(.*)\.position_ids", None),
    *batch_norm(r"(.*)\.bn", r"\1/norm"),
    KeyRule(r"(.*)\.weight", r"\1/kernel", "conv", ndim=4),
    KeyRule(r"(.*)\.weight", r"\1/kernel", "linear", ndim=2),
    KeyRule(r"(.*)\.bias", r"\1/bias"),
]


def test_apply_key_map_routes_transforms_and_reports_unused():
    sd = {
        "emb.weight": np.arange(6.0).reshape(3, 2),
        "enc.layer.0.dense.weight": np.arange(6.0).reshape(2, 3),
        "enc.layer.0.dense.bias": np.zeros(2),
        "enc.LayerNorm.gamma": np.ones(2),
        "enc.position_ids": np.arange(4),
        "stem.conv.weight": np.zeros((8, 3, 5, 7)),
        "stem.bn.weight": np.ones(8), "stem.bn.bias": np.zeros(8),
        "stem.bn.running_mean": np.full(8, 2.0), "stem.bn.running_var": np.full(8, 3.0),
        "stem.bn.num_batches_tracked": np.array(5),
        "mystery": np.zeros(1),
    }
    out, unused = apply_key_map(RULES, sd)
    p, bs = out["params"], out["batch_stats"]
    assert unused == ["mystery"]
    np.testing.assert_array_equal(p["enc/layer/0/dense/kernel"], sd["enc.layer.0.dense.weight"].T)
    assert p["stem/conv/kernel"].shape == (5, 7, 3, 8)
    assert set(bs) == {"stem/norm/mean", "stem/norm/var"} and bs["stem/norm/var"][0] == 3.0
    assert "stem/norm/scale" in p and "enc/LayerNorm/scale" in p
    assert not any("position_ids" in k or "num_batches" in k for k in p)


def test_duplicate_target_is_an_error():
    rules = [KeyRule(r"(?:a|b)\.weight", "x/kernel", "linear")]
    with pytest.raises(ValueError, match="both"):
        apply_key_map(rules, {"a.weight": np.zeros((2, 2)), "b.weight": np.zeros((2, 2))})


def test_conv_transform_and_strip_prefix():
    w = np.random.default_rng(0).normal(size=(4, 3, 2, 5))
    assert conv(w)[1, 4, 2, 3] == w[3, 2, 1, 4]
    inner, rest = strip_prefix({"bert.a.weight": 1, "classifier.weight": 2}, "bert")
    assert inner == {"a.weight": 1} and rest == {"classifier.weight": 2}
    out, unused = apply_key_map(generic_rules(), {"classifier.1.weight": np.zeros((3, 5))})
    assert out["params"]["classifier/1/kernel"].shape == (5, 3) and unused == []


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_named_transform_has_an_exact_inverse(name):
    rng = np.random.default_rng(0)
    shapes = {"linear": [(3, 5)], "conv": [(4, 3, 2, 5), (4, 3, 7), (2, 3, 1, 2, 3)]}.get(name, [(7,), (3, 5)])
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        t = TRANSFORMS[name]
        y = t(x)
        back = KeyRule("a", "b", name).inverse(y)
        np.testing.assert_array_equal(back, x)
        assert back.shape == x.shape and back.flags.c_contiguous
        if name in ("linear", "conv"):
            assert y.shape != x.shape  # the forward moved axes, so the check above is not vacuous


def test_inverse_shapes_and_errors():
    w = np.zeros((8, 3, 5, 7))  # torch (O, I, kh, kw)
    assert conv(w).shape == (5, 7, 3, 8) and TRANSFORMS["conv"].inverse(conv(w)).shape == (8, 3, 5, 7)
    with pytest.raises(ValueError, match="2-D"):
        TRANSFORMS["linear"].inverse(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no inverse"):
        KeyRule("a", "b", lambda x: x * 2).inverse
    doubled = KeyRule("a", "b", Transform(lambda x: x * 2, lambda x: x / 2))
    np.testing.assert_array_equal(doubled.inverse(doubled.fn(np.arange(3.0))), np.arange(3.0))
    with pytest.raises(ValueError, match="unknown transform 'linaer'"):
        KeyRule("a", "b", "linaer")


def test_invert_rule_turns_src_into_a_template_and_dst_into_a_regex():
    from jaxfer.models.keymap import NotInvertible, invert_rule

    rx, parts = invert_rule(KeyRule(r"(.*)\.LayerNorm\.(?:weight|gamma)", r"\1/LayerNorm/scale"))
    m = rx.fullmatch("encoder/layer/3/output/LayerNorm/scale")
    assert "".join(p if isinstance(p, str) else m.group(f"g{p}").replace("/", ".") for p in parts) == \
        "encoder.layer.3.output.LayerNorm.weight"
    assert invert_rule(KeyRule(r"(.*)\.position_ids", None)) is None
    with pytest.raises(NotInvertible, match="not written"):
        invert_rule(KeyRule(r"(a|b)\.(\d+)\.weight", r"x/\2/kernel"))
    with pytest.raises(NotInvertible, match="outside a capturing group"):
        invert_rule(KeyRule(r"layer\d\.weight", "layer/kernel"))


def test_invert_key_map_is_the_exact_inverse_and_reports_what_it_cannot_take_back():
    from jaxfer.models.keymap import invert_key_map

    sd = {"emb.weight": np.arange(6.0).reshape(3, 2), "enc.layer.0.dense.weight": np.arange(6.0).reshape(2, 3),
          "enc.layer.0.dense.bias": np.zeros(2), "enc.LayerNorm.weight": np.ones(2),
          "stem.conv.weight": np.random.default_rng(0).normal(size=(8, 3, 5, 7)),
          "stem.bn.weight": np.ones(8), "stem.bn.bias": np.zeros(8),
          "stem.bn.running_mean": np.full(8, 2.0), "stem.bn.running_var": np.full(8, 3.0)}
    ours, unused = apply_key_map(RULES, sd)
    assert unused == []
    back, unmatched = invert_key_map(RULES, {**ours, "extra": {"x": np.zeros(1)}})
    assert unmatched == ["extra:x"]
    assert back.keys() == sd.keys()  # gamma was read as weight: written back as weight
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)
    # a rule order under which the inverse lands on another rule's key is caught
    shadowing = [KeyRule(r"(.*)\.bias", r"\1/bias"), KeyRule(r"(.*)\.bn\.bias", r"\1/bn_bias")]
    with pytest.raises(ValueError, match="does not invert"):
        invert_key_map(shadowing, {"params": {"stem/bn_bias": np.zeros(2)}})
