"""Named feature maps: the modules each family names, captured without touching model code,
equal the family's own hidden states; bad layer names are errors naming real modules."""

import numpy as np
import pytest

import jaxfer as jf
from jaxfer import tree
from jaxfer.models import feature_maps

VGG = {"model_type": "vgg", "widths": ((4,), (8,), (8, 8), (8, 8), (8, 8)), "fc_features": (16, 16)}
VIT = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 32, "image_size": 16, "patch_size": 8, "num_channels": 3}


def pixels(size):
    return np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)


def test_vgg_stages_equal_its_hidden_states_with_and_without_a_head():
    x = pixels(32)
    for head in (None, jf.heads.Classifier(3)):
        model = jf.init_model(VGG, head, rng=0)
        maps = feature_maps.feature_maps(model, pixel_values=x)
        assert list(maps) == [f"blocks/{b}" for b in range(5)]
        hidden = model.module.apply(model.variables, pixel_values=x, output_hidden_states=True)["hidden_states"]
        for got, want in zip(maps.values(), hidden):
            np.testing.assert_array_equal(np.transpose(np.asarray(got), (0, 3, 1, 2)), want)  # NHWC vs NCHW
        assert [m.shape[1] for m in maps.values()] == [32, 16, 8, 4, 2]


def test_any_module_path_and_the_transformer_layers():
    model = jf.init_model(VIT, jf.heads.Classifier(2), rng=0)
    x = pixels(16)
    maps = feature_maps.feature_maps(model, pixel_values=x)
    assert list(maps) == ["embeddings", "encoder/layer/0", "encoder/layer/1"]
    hidden = model.module.apply(model.variables, pixel_values=x, output_hidden_states=True)["hidden_states"]
    for got, want in zip(maps.values(), hidden):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    one = feature_maps.feature_maps(model, ["encoder/layer/1/attention"], pixel_values=x)
    assert one["encoder/layer/1/attention"].shape == (2, 5, 16)
    with pytest.raises(tree.NoMatchError, match=r"feature layer 'encoder/layer/7'(?s:.*)encoder/layer/1"):
        feature_maps.feature_maps(model, ["encoder/layer/7"], pixel_values=x)


@pytest.mark.parametrize("config, size", [
    ({"model_type": "resnet", "embedding_size": 8, "hidden_sizes": (8, 16), "depths": (1, 1), "layer_type": "basic"},
     32),
    ({"model_type": "efficientnet_lite", "variant": "lite0", "width_coefficient": 0.25, "depth_coefficient": 0.25,
      "fix_head_stem": False}, 32),
])
def test_every_named_layer_of_the_cnn_families_is_captured(config, size):
    model = jf.init_model(config, rng=0)
    maps = feature_maps.feature_maps(model, pixel_values=pixels(size))
    assert list(maps) == list(feature_maps.layer_names(model))
    sides = [m.shape[1] for m in maps.values()]  # NHWC: shallow to deep, never growing
    assert sides == sorted(sides, reverse=True) and sides[-1] < size
