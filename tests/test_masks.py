import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxfer import masks as M
from jaxfer import param_table, tree

L = 4


def bert_like():
    """A 4-layer BERT-shaped toy params tree (tiny numpy arrays)."""
    f = lambda *s: np.zeros(s, np.float32)
    layer = lambda: {
        "attention": {"self": {n: {"kernel": f(4, 4), "bias": f(4)} for n in ("query", "key")},
                      "output": {"LayerNorm": {"scale": f(4), "bias": f(4)}}},
        "output": {"dense": {"kernel": f(8, 4), "bias": f(4)}},
    }
    return {
        "bert": {
            "embeddings": {"word_embeddings": {"embedding": f(10, 4)},
                           "position_embeddings": {"embedding": f(6, 4)},
                           "LayerNorm": {"scale": f(4), "bias": f(4)}},
            "encoder": {"layer": {str(i): layer() for i in range(L)}},
            "pooler": {"dense": {"kernel": f(4, 4), "bias": f(4)}},
        },
        "classifier": {"kernel": f(4, 3), "bias": f(3)},
    }


PARAMS = bert_like()
PATHS = tree.paths(PARAMS)


def selected(mask, params=PARAMS, strict=True):
    return {p for p, v in tree.flatten(M.resolve(mask, params, strict=strict)).items() if v}


# ------------------------------------------------------------------ algebra
SEGS = ["a", "b", "c", "0", "1"]
path_sets = st.lists(st.lists(st.sampled_from(SEGS), min_size=1, max_size=4).map("/".join),
                     min_size=1, max_size=12, unique=True)
atoms = st.one_of(
    st.lists(st.sampled_from(SEGS + ["*", "**"]), min_size=1, max_size=3).map(lambda s: M.glob("/".join(s))),
    st.sampled_from([M.bias(), M.everything(), M.nothing(), M.regex(r"a.*"), M.regex(r".*[01]")]),
)
mask_exprs = st.recursive(atoms, lambda sub: st.one_of(
    st.tuples(sub, sub).map(lambda t: t[0] & t[1]),
    st.tuples(sub, sub).map(lambda t: t[0] | t[1]),
    st.tuples(sub, sub).map(lambda t: t[0] - t[1]),
    sub.map(lambda m: ~m)), max_leaves=6)


def tree_of(paths):
    # prefix-free so that unflatten works: make every path end in its own leaf
    return tree.unflatten({p + "/w": np.zeros(1) for p in paths})


def bools(mask, params):
    return tree.flatten(M.resolve(mask, params, strict=False))


@settings(max_examples=60, deadline=None)
@given(path_sets, mask_exprs, mask_exprs)
def test_algebra_laws(paths, a, b):
    t = tree_of(paths)
    ra, rb = bools(a, t), bools(b, t)
    assert bools(a | b, t) == {p: ra[p] or rb[p] for p in ra}
    assert bools(a & b, t) == {p: ra[p] and rb[p] for p in ra}
    assert bools(a - b, t) == {p: ra[p] and not rb[p] for p in ra}
    assert bools(~(a | b), t) == bools(~a & ~b, t)  # De Morgan
    assert bools(~(a & b), t) == bools(~a | ~b, t)
    assert bools(a | a, t) == ra == bools(a & a, t)  # idempotence
    assert bools(~~a, t) == ra  # double negation
    assert bools(a | ~a, t) == bools(M.everything(), t)
    assert bools(a & ~a, t) == bools(M.nothing(), t)


def test_str_names_the_patterns():
    m = M.glob("bert/**") & ~M.bias()
    assert str(m) == "glob('bert/**') & ~bias()"
    assert str(~(M.glob("a") | M.norm()) & M.layers(2, 4)) == "~(glob('a') | norm()) & layers(2, 4)"
    assert str(M.as_mask("re:x.*")) == "regex('x.*')"
    assert str("classifier/**" | M.layers(3)) == "glob('classifier/**') | layers(3)"
    with pytest.raises(TypeError, match="truth value"):
        bool(M.bias())


# ---------------------------------------------------------------- selectors
def test_selectors_on_bert_like_tree():
    assert selected("classifier/*") == {"classifier/kernel", "classifier/bias"}
    assert selected(M.regex(r"bert/encoder/layer/[13]/output/dense/kernel")) == {
        "bert/encoder/layer/1/output/dense/kernel", "bert/encoder/layer/3/output/dense/kernel"}
    assert selected(["classifier/bias", "bert/pooler/**"]) == {
        "classifier/bias", "bert/pooler/dense/kernel", "bert/pooler/dense/bias"}
    top = selected(M.layers(2))
    assert top and all(p.startswith(("bert/encoder/layer/2/", "bert/encoder/layer/3/")) for p in top)
    assert len(top) == 2 * len(selected("bert/encoder/layer/0/**"))
    assert selected(M.layers(1, 2)) == selected("bert/encoder/layer/1/**")
    assert all(p.endswith("/bias") for p in selected(M.bias()))
    assert "bert/encoder/layer/0/attention/output/LayerNorm/bias" in selected(M.bias())
    assert selected(M.norm()) == {p for p in PATHS if "/LayerNorm/" in p}
    assert selected(M.embeddings()) == {p for p in PATHS if p.startswith("bert/embeddings/")}
    assert selected(M.kind("bias", "norm")) == selected(M.bias() | M.norm())
    assert selected(M.everything()) == set(PATHS) and selected(M.nothing(), strict=False) == set()


def test_norm_names_across_families():
    names = ["vit/encoder/layer/0/layernorm_before/scale", "resnet/embedder/embedder/normalization/bias",
             "m/BatchNorm_0/scale", "gpt/h/0/ln_1/scale", "gpt/ln_f/bias", "m/bn2/scale", "m/block/gamma"]
    not_norm = ["m/kernel", "m/lnx/kernel", "m/dense/bias", "m/linear/kernel"]
    t = tree.unflatten({p: np.zeros(1) for p in names + not_norm})
    assert selected(M.norm(), t) == set(names)


def test_layers_with_family_patterns():
    paths = ["resnet/embedder/embedder/convolution/kernel",
             "resnet/encoder/stages/0/layers/1/layer/2/convolution/kernel",
             "resnet/encoder/stages/1/layers/0/layer/0/convolution/kernel",
             "classifier/kernel"]
    t = tree.unflatten({p: np.zeros(1) for p in paths})
    # default pattern picks the stage index, not the inner layers/layer indices
    assert selected(M.layers(1), t) == {paths[2]}
    assert selected(M.layers(0, 1, pattern=r"encoder/stages/(\d+)/"), t) == {paths[1]}
    by_fn = M.layers(0, pattern=lambda p: 7 if "classifier" in p else None)
    assert selected(by_fn, t) == {"classifier/kernel"}


# ------------------------------------------------------------------ strict
def test_pattern_matching_nothing_raises_with_nearest_paths():
    with pytest.raises(tree.NoMatchError) as e:
        M.resolve(M.glob("bert/encoder/layers/*/**") | M.bias(), PARAMS)
    msg = str(e.value)
    assert "bert/encoder/layers/*/**" in msg and "bert/encoder/layer/" in msg
    # a dead pattern inside an otherwise live mask still raises
    with pytest.raises(tree.NoMatchError, match="classifer"):
        M.resolve(M.glob("classifier/**", "classifer/**"), PARAMS)
    assert selected(M.glob("nope/**") | M.bias(), strict=False) == selected(M.bias())


def test_empty_layer_range_raises():
    with pytest.raises(tree.NoMatchError, match=r"layers\(4\)[\s\S]*indices present: \[0, 1, 2, 3\]"):
        M.resolve(M.layers(4), PARAMS)


# ------------------------------------------------------------------- rules
def test_rules_first_match_wins():
    rules = [("classifier/**", 1.0), (M.layers(3), 0.5), (M.bias(), 0.1), ("**", None)]
    values, by = M.apply_rules(PARAMS, rules)
    v, b = tree.flatten(values), tree.flatten(by)
    assert v["classifier/bias"] == 1.0 and b["classifier/bias"] == "classifier/**"
    assert v["bert/encoder/layer/3/output/dense/bias"] == 0.5 and b["bert/encoder/layer/3/output/dense/bias"] == "layers(3)"
    assert v["bert/encoder/layer/0/output/dense/bias"] == 0.1 and b["bert/pooler/dense/bias"] == "bias()"
    assert "bert/pooler/dense/kernel" not in v  # None values are absent leaves
    assert tree.flatten(by)["bert/pooler/dense/kernel"] == "**"
    trainable = tree.flatten(M.trainable_mask(PARAMS, rules))
    assert trainable["bert/pooler/dense/bias"] and not trainable["bert/pooler/dense/kernel"]
    mult = tree.flatten(M.lr_multipliers(PARAMS, rules))
    assert mult["bert/pooler/dense/kernel"] == 0.0 and mult["bert/encoder/layer/3/output/dense/kernel"] == 0.5


def test_rule_errors():
    with pytest.raises(tree.NoMatchError, match=r"rule 1 'clasifier/\*\*'[\s\S]*classifier/"):
        M.apply_rules(PARAMS, [("bert/**", None), ("clasifier/**", 1.0), ("**", 1.0)])
    with pytest.raises(tree.NoMatchError, match=r"in rule 0 .*'bert/pooler/dens/\*'"):
        M.apply_rules(PARAMS, [(M.glob("classifier/*", "bert/pooler/dens/*"), 1.0), ("**", None)])
    with pytest.raises(M.ShadowedRuleError, match=r"rule 1 \(classifier/kernel\).*rule\(s\) 0 \(classifier/\*\*\)"):
        M.apply_rules(PARAMS, [("classifier/**", 1.0), ("classifier/kernel", 0.5), ("**", None)])
    with pytest.raises(M.UnmatchedPathError, match=r"bert/embeddings[\s\S]*\('\*\*', value\)"):
        M.apply_rules(PARAMS, [("classifier/**", 1.0)])
    with pytest.raises(TypeError, match="did you mean"):
        M.apply_rules(PARAMS, ("**", 1.0))
    # not strict: dead and shadowed rules are tolerated, unmatched leaves are not
    M.apply_rules(PARAMS, [("nope", 1), ("**", 1.0), ("classifier/**", None)], strict=False)


def test_layer_decay_multipliers_beit_convention():
    mult = tree.flatten(M.lr_multipliers(PARAMS, [("**", 1.0)], layer_decay=0.5, num_layers=L))
    assert mult["bert/embeddings/word_embeddings/embedding"] == 0.5 ** 5
    assert mult["bert/embeddings/LayerNorm/scale"] == 0.5 ** 5
    expected = {0: 0.0625, 1: 0.125, 2: 0.25, 3: 0.5}
    for i, m in expected.items():
        assert mult[f"bert/encoder/layer/{i}/attention/self/query/kernel"] == m
        assert mult[f"bert/encoder/layer/{i}/output/dense/bias"] == m
    assert mult["bert/pooler/dense/kernel"] == 1.0 and mult["classifier/bias"] == 1.0
    inferred = tree.flatten(M.lr_multipliers(PARAMS, [("**", 2.0)], layer_decay=0.5))
    assert inferred["bert/encoder/layer/0/output/dense/kernel"] == 2.0 * 0.0625


# ----------------------------------------------------------------- explain
def test_explain_totals_and_render():
    rules = [("classifier/**", 1.0), (M.layers(2), 0.5), ("**", None)]
    table = param_table.explain(PARAMS, rules, weight_decay_mask=M.default_weight_decay_mask, layer_decay=0.5)
    t = table.totals
    assert t["params"] == tree.count(PARAMS) == sum(r.count for r in table.rows)
    trainable = M.trainable_mask(PARAMS, rules)
    expected = sum(tree.count(x) for x, m in zip(tree.flatten(PARAMS).values(), tree.flatten(trainable).values()) if m)
    assert t["trainable"] == expected == tree.count(tree.partition(PARAMS, trainable)[0])
    assert 0 < t["trainable"] < t["params"] and t["frozen"] == t["params"] - t["trainable"]
    assert t["bytes"] == tree.nbytes(PARAMS) and t["trainable_bytes"] == 4 * t["trainable"]
    rows = {r.path: r for r in table.rows}
    r = rows["bert/encoder/layer/3/output/dense/kernel"]
    assert (r.shape, r.count, r.trainable, r.lr, r.weight_decay, r.decided_by) == ((8, 4), 32, True, 0.25, True, "layers(2)")
    assert rows["bert/encoder/layer/3/output/dense/bias"].weight_decay is False
    assert rows["bert/encoder/layer/0/output/dense/kernel"].weight_decay is False  # frozen: no decay
    text = str(table)
    assert "decided by" in text and "layers(2)" in text and f"{t['params']:,}" in text
    assert "bert/encoder/layer/3/output/dense/kernel" in text and "(8, 4)" in text

    grouped = param_table.explain(PARAMS, rules, depth=2)
    g = {r.path: r for r in grouped.rows}
    assert set(g) == {"bert/embeddings/**", "bert/encoder/**", "bert/pooler/**",
                      "classifier/kernel", "classifier/bias"}  # leaves at depth <= 2 stay rows
    assert g["bert/encoder/**"].trainable == "partial" and g["bert/embeddings/**"].trainable is False
    assert g["bert/encoder/**"].count == tree.count(PARAMS["bert"]["encoder"])
    assert grouped.totals == param_table.explain(PARAMS, rules).totals


def test_default_weight_decay_mask():
    wd = tree.flatten(M.default_weight_decay_mask(PARAMS))
    assert wd["bert/embeddings/word_embeddings/embedding"] and wd["classifier/kernel"]
    assert not wd["classifier/bias"] and not wd["bert/embeddings/LayerNorm/scale"]
    assert not any(wd[p] for p in PATHS if p.endswith("/bias") or "LayerNorm" in p)
