import ml_collections
import pytest

from jaxfer import config as jconfig
from jaxfer.errors import ConfigError

RECIPE = '''
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, name="adamw", clip=None, betas=(0.9, 0.999)))
    c.train = ml_collections.ConfigDict(dict(steps=10, smoke=arg == "smoke"))
    return c
'''


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    return str(path)


def test_overrides_are_typed(recipe):
    rest, overrides = jconfig.split_overrides(
        ["--workdir", "x", "--config.optim.lr=3e-5", "--config.train.steps", "7",
         "--config.optim.betas=(0.8, 0.99)", "--config.optim.clip=1.0"])
    assert rest == ["--workdir", "x"]
    c = jconfig.load_with_overrides(recipe, overrides)
    assert c.optim.lr == 3e-5 and isinstance(c.optim.lr, float)
    assert c.train.steps == 7 and c.optim.betas == (0.8, 0.99) and c.optim.clip == 1.0


def test_recipe_argument(recipe):
    assert jconfig.load(recipe + ":smoke").train.smoke is True
    assert jconfig.load(recipe).train.smoke is False


def test_unknown_key_names_the_key(recipe):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*optim\.lr"):
        jconfig.load_with_overrides(recipe, [("optim.lrr", "1")])
    with pytest.raises(ConfigError, match="nope"):
        jconfig.load_with_overrides(recipe, [("nope.x", "1")])


def test_bad_value_names_the_key(recipe):
    with pytest.raises(ConfigError, match="train.steps"):
        jconfig.load_with_overrides(recipe, [("train.steps", "many")])


def test_missing_file_and_function(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        jconfig.load(str(tmp_path / "nothere.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        jconfig.load(str(bad))
    bad.write_text("def get_config(:\n")
    with pytest.raises(ConfigError, match="does not run: SyntaxError"):
        jconfig.load(str(bad))


def test_loaded_config_is_locked(recipe):
    c = jconfig.load(recipe)
    assert isinstance(c, ml_collections.ConfigDict)
    with pytest.raises(AttributeError):
        c.new_key = 1


def test_a_section_is_replaced_by_a_dict_literal(recipe):
    c = jconfig.load_with_overrides(recipe, [("train", "{'steps': 3, 'smoke': True, 'extra': 'x'}")])
    assert isinstance(c.train, ml_collections.ConfigDict) and c.train.to_dict() == {
        "steps": 3, "smoke": True, "extra": "x"}
    with pytest.raises(ValueError, match="train.*dict literal"):
        jconfig.load_with_overrides(recipe, [("train", "3")])
