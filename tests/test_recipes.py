"""Recipes: --bits parsing, unknown keys, --set typing, precedence, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbitdm_cli.errors import RecipeError
from lowbitdm_cli.recipes import Recipe, available_recipes, load_recipe, parse_bits


@pytest.mark.parametrize("text, expected", [
    ("w4a4", (4, 4)),
    ("w8a8", (8, 8)),
    ("W2A4", (2, 4)),
    ("w4afp", (4, None)),
    ("wfpa8", (None, 8)),
    ("fp", (None, None)),
    (" w4a8 ", (4, 8)),
], ids=["w4a4", "w8a8", "W2A4", "w4afp", "wfpa8", "fp", "spaces"])
def test_parse_bits(text: str, expected: tuple) -> None:
    assert parse_bits(text) == expected


@pytest.mark.parametrize("text, hint", [
    ("w9a4", "weight bits must be in 2..8, got 9"),
    ("w4a9", "activation bits must be in 2..8, got 9"),
    ("w1a4", "weight bits must be in 2..8, got 1"),
    ("x4", "use wXaY"),
    ("w4", "use wXaY"),
    ("", "use wXaY"),
], ids=["w9a4", "w4a9", "w1a4", "x4", "w4", "empty"])
def test_parse_bits_errors(text: str, hint: str) -> None:
    with pytest.raises(RecipeError) as e:
        parse_bits(text)
    assert hint in str(e.value)
    assert repr(text) in str(e.value)  # names what the user typed


@pytest.mark.parametrize("bits", ["w9a4", "x4"])
def test_bad_bits_in_recipe(bits: str) -> None:
    with pytest.raises(RecipeError, match=r"quant\.bits.*2\.\.8"):
        load_recipe("ptq", bits=bits)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[quant]\nbits = "w4a4"\nbitz = "w4a4"\n')
    with pytest.raises(RecipeError, match=r"quant\.bitz: unknown key"):
        load_recipe(path)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[quantize]\nbits = "w4a4"\n')
    with pytest.raises(RecipeError, match="quantize: unknown key"):
        load_recipe(path)


@pytest.mark.parametrize("assignment", ["quant.bitz=w4a4", "sample.num_sample=3", "nope.key=1"],
                         ids=["quant", "sample", "section"])
def test_unknown_key_via_set(assignment: str) -> None:
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe("ptq", sets=[assignment])


@pytest.mark.parametrize("assignment", ["num_samples=3", "sample.num_samples", "sample..x=1", "=1"],
                         ids=["no-section", "no-value", "empty-part", "no-key"])
def test_malformed_set(assignment: str) -> None:
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe("ptq", sets=[assignment])


def test_set_parses_types() -> None:
    r = load_recipe("ptq", sets=["sample.num_samples=7", "sample.eta=0.5", "quant.w_symmetric=true",
                                 "quant.skip=['conv_in']", "quant.bits=w4a4"])
    assert r.sample.num_samples == 7 and type(r.sample.num_samples) is int
    assert r.sample.eta == 0.5
    assert r.quant.w_symmetric is True
    assert r.quant.skip == ["conv_in"]
    assert r.quant.bits == "w4a4"  # a bare word stays a string


def test_set_wrong_type() -> None:
    with pytest.raises(RecipeError, match="sample.num_samples"):
        load_recipe("ptq", sets=["sample.num_samples=many"])


def test_precedence_flags_over_set_over_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('name = "r"\n[model]\nname = "digits"\n[quant]\nbits = "w8a8"\n[sample]\nnum_samples = 3\n')
    assert load_recipe(path).quant.bits == "w8a8"
    assert load_recipe(path, sets=["quant.bits=w4a4"]).quant.bits == "w4a4"
    r = load_recipe(path, sets=["quant.bits=w4a4", "model.name=digits"], bits="w2a4", model="tiny-random")
    assert (r.quant.bits, r.model.name, r.sample.num_samples) == ("w2a4", "tiny-random", 3)


def test_base_recipe_used_when_none_named() -> None:
    base = load_recipe("ptq", bits="w4a8", sets=["sample.num_samples=9"]).model_dump(mode="json")
    r = load_recipe(None, base=base, sets=["sample.batch_size=3"])
    assert (r.name, r.quant.bits, r.sample.num_samples, r.sample.batch_size) == ("ptq", "w4a8", 9, 3)
    assert base["sample"]["batch_size"] != 3  # base not mutated


def test_unknown_recipe_name() -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*ptq"):
        load_recipe("nope")


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[quant\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(path)


def test_resolved_fills_only_unset_sampler_fields() -> None:
    r = load_recipe("ptq", sets=["sample.steps=4"]).resolved({"steps": 10, "eta": 0.0, "guidance": 2.0,
                                                                "clip_x0": True})
    assert (r.sample.steps, r.sample.eta, r.sample.guidance, r.sample.clip_x0) == (4, 0.0, 2.0, True)


RECIPES = available_recipes()


def test_recipes_shipped() -> None:
    assert "ptq" in RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_loads(name: str) -> None:
    r = load_recipe(name)
    assert isinstance(r, Recipe)
    assert r.name == name
    assert parse_bits(r.quant.bits)
    r.quant.policy()


def test_packaged_recipes_are_the_top_level_folder() -> None:
    # one source: the package's recipe_files link reads recipes/, which a wheel build copies in
    from pathlib import Path

    import lowbitdm_cli

    top = Path(__file__).resolve().parents[1] / "recipes"
    packaged = Path(lowbitdm_cli.__file__).parent / "recipe_files"
    assert packaged.resolve() == top.resolve()
    assert sorted(RECIPES) == sorted(p.stem for p in top.glob("*.toml"))


def test_recipe_schema_version(tmp_path: Path) -> None:
    from lowbitdm_cli.recipes import RECIPE_VERSION

    assert load_recipe("ptq").schema_version == RECIPE_VERSION
    # the current version stays out of the dump, so manifests' inputs digests stay what they were
    assert "schema_version" not in load_recipe("ptq").model_dump()
    path = tmp_path / "r.toml"
    path.write_text(f'schema_version = {RECIPE_VERSION + 1}\nname = "r"\n')
    with pytest.raises(RecipeError, match=r"recipe: schema_version: version \d+ is newer.*upgrade lowbitdm"):
        load_recipe(path)


def test_efficientdm_plus_keeps_the_shortcuts_at_8_bits() -> None:
    """The recipe's one policy change: role `shortcut` (1x1 residual-stream projections) at W8A8,
    every other ResBlock conv at the nominal width; the bit budget counts them."""
    from lowbitdm_cli.quant.cost import bit_budget, layer_macs
    from lowbitdm_cli.quant.policy import build_layer_specs
    from lowbitdm_cli.stages.common import load_fp_model

    recipe = load_recipe("efficientdm-plus", model="tiny-random", bits="w4a4")
    assert recipe.finetune.trajectory == "student"
    model = load_fp_model("tiny-random", recipe)
    specs = build_layer_specs(model.denoiser, recipe.quant)
    shortcuts = {n for n, s in specs.items() if s.role == "shortcut"}
    assert shortcuts, "tiny-random has no 1x1 shortcut: the test needs one"
    assert all((specs[n].w_bits, specs[n].a_bits) == (8, 8) for n in shortcuts)
    assert all((s.w_bits, s.a_bits) == (4, 4) for s in specs.values() if s.role == "conv")
    budget = bit_budget(specs, layer_macs(model, list(specs)))
    assert 4 < budget["mean_a_bits"] < 8 and budget["a_bits_mac_share"]["8"] > 0


def test_micro_batch_must_divide_the_batch() -> None:
    assert load_recipe("efficientdm", sets=["finetune.micro_batch=8"]).finetune.micro_batch == 8
    with pytest.raises(RecipeError, match=r"micro_batch \(5\) must divide batch_size \(32\)"):
        load_recipe("efficientdm", sets=["finetune.micro_batch=5"])
    # unset, it stays out of the recipe dump: the inputs digests of earlier artifacts stay valid
    assert "micro_batch" not in load_recipe("efficientdm").model_dump()["finetune"]
    assert load_recipe("efficientdm", sets=["finetune.micro_batch=8"]).model_dump()["finetune"]["micro_batch"] == 8
