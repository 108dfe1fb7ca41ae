"""Recipes and configs: YAML round trips and validation that names the field, before work."""
import pytest

from slimformer.errors import ConfigError
from slimformer.quant import RTNConfig, W8A8Config
from slimformer.recipe import DEFAULT_RECIPE, Recipe, load_recipe, named_recipes

MIXED = """
version: 1
name: mixed
stages:
- method: rtn
  bits: 3
  group_size: 32
  symmetric: false
  targets: ["re:.*mlp\\\\..*", "model.layers.0.self_attn.q_proj"]
  ignore: ["re:.*\\\\.2\\\\..*"]
  overrides:
    "re:.*down_proj": {bits: 8, group_size: null}
- method: w8a8
  activations: static
  targets: ["re:.*self_attn\\\\.[kv]_proj"]
"""


def test_yaml_round_trip_exact():
    r = Recipe.from_yaml(MIXED)
    text = r.to_yaml()
    again = Recipe.from_yaml(text)
    assert again == r
    assert again.to_yaml() == text
    assert isinstance(r.stages[0], RTNConfig) and r.stages[0].bits == 3 and r.stages[0].symmetric is False
    assert r.stages[0].overrides == {"re:.*down_proj": {"bits": 8, "group_size": None}}
    assert isinstance(r.stages[1], W8A8Config) and r.stages[1].activations == "static"


def test_objects_round_trip():
    r = Recipe(stages=(RTNConfig(bits=5, group_size=None, ignore=("lm_head",)), W8A8Config()))
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_named_recipes():
    assert {"w8a8", "w8a8-plain", "w4-g64", "w4-g128", "w8a8-static"} <= set(named_recipes())
    assert DEFAULT_RECIPE in named_recipes()
    assert load_recipe("w4-g64").stages[0] == RTNConfig(bits=4, group_size=64, symmetric=True)
    assert load_recipe("w8a8-static").stages[0].activations == "static"
    assert load_recipe("w8a8-static").needs_calibration and not load_recipe("w8a8-plain").needs_calibration
    # w8a8 = SmoothQuant then dynamic W8A8 (calibrated: the smoothing scales need activations)
    assert [s.METHOD for s in load_recipe("w8a8").stages] == ["smoothquant", "w8a8"]
    assert load_recipe("w8a8").needs_calibration
    assert load_recipe("w8a8").head == "int8" and load_recipe("w8a8-plain").head is None
    assert load_recipe("w4-g64-h8").stages == load_recipe("w4-g64").stages
    assert load_recipe("w4-g64-h8").head == "int8" and load_recipe("w4-g64").head is None
    w8 = load_recipe("w8")  # the speculative self-draft: 8-bit per-channel weight-only + int8 head
    assert w8.head == "int8" and not w8.needs_calibration
    assert [(st.METHOD, st.bits, st.group_size, st.symmetric) for st in w8.stages] == [("rtn", 8, None, True)]


def test_override_applies_per_module():
    c = RTNConfig(bits=4, overrides={"re:.*down_proj": {"bits": 8}})
    assert c.for_module("model.layers.1.mlp.down_proj").bits == 8
    assert c.for_module("model.layers.1.mlp.up_proj").bits == 4


@pytest.mark.parametrize("text, field, allowed", [
    ("- {method: rtn, bits: 1}", "rtn.bits", "2..8"),
    ("- {method: rtn, bits: 9}", "rtn.bits", "2..8"),
    ("- {method: rtn, group_size: 0}", "rtn.group_size", ">= 1"),
    ("- {method: rtn, format: int3}", "rtn.format", "'nf4'"),
    ("- {method: rtn, symmetric: maybe}", "rtn.symmetric", "true, false"),
    ("- {method: gptq9}", "method", "rtn"),
    ("- {method: w8a8, activations: sometimes}", "w8a8.activations", "'static'"),
    ("- {method: rtn, bitz: 4}", "rtn.bitz", "group_size"),
    ("- {method: rtn, overrides: {'re:.*': {bits: 1}}}", "rtn.bits", "2..8"),
    ("- {method: rtn, overrides: {'re:.*': {targets: [x]}}}", "targets", "bits"),
    ("- {method: rtn, targets: ['re:(']}", "rtn.targets", "regex"),
    ("- {method: rtn, format: nf4, bits: 3}", "rtn", "4"),
])
def test_invalid_values_name_the_field(text, field, allowed):
    with pytest.raises(ConfigError) as e:
        Recipe.from_yaml("version: 1\nstages:\n" + text)
    msg = str(e.value)
    assert field in msg and allowed in msg, msg


def test_bad_recipe_shapes():
    with pytest.raises(ConfigError, match="recipe.version"):
        Recipe.from_yaml("version: 7\nstages: [{method: rtn}]")
    with pytest.raises(ConfigError, match="recipe.stages"):
        Recipe.from_yaml("version: 1\nstages: []")
    with pytest.raises(ConfigError, match="unknown name"):
        load_recipe("w5-g7")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        Recipe.from_yaml("stages: [")


def test_recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(MIXED)
    assert load_recipe(str(p)) == Recipe.from_yaml(MIXED)


def test_head_field_round_trips_and_is_checked():
    r = Recipe.from_yaml("version: 1\nstages: [{method: w8a8}]\nhead: int8")
    assert r.head == "int8" and Recipe.from_yaml(r.to_yaml()) == r
    assert "head" not in Recipe.from_yaml("version: 1\nstages: [{method: w8a8}]").to_dict()
    with pytest.raises(ConfigError, match="recipe.head.*int8"):
        Recipe.from_yaml("version: 1\nstages: [{method: w8a8}]\nhead: int3")
