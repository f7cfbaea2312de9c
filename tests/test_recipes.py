import pytest

from onnxsmith.core.errors import UserError
from onnxsmith.optimizer.recipes import builtin_recipes, load_recipe


def test_cleanup_is_built_in_and_builds_its_passes():
    recipe = builtin_recipes()["cleanup"]
    assert recipe.description
    names = [p.name for p in recipe.build()]
    assert names[0] == "constants-to-initializers" and "fold-batchnorm" in names
    assert all(p.lossless for p in recipe.build())


def test_recipe_file_with_options(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\npasses = ["constant-folding"]\n[options.constant-folding]\nsize_threshold = 8\n')
    passes = load_recipe(str(path)).build()
    assert passes[0].options.size_threshold == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('passes = ["shape-inference"]\ncolour = "red"\n', "unknown keys \\['colour'\\]"),
        ('passes = ["no-such-pass"]\n', "unknown pass 'no-such-pass'"),
        ("passes = []\n", "non-empty list"),
        ('passes = ["constant-folding"]\n[options.constant-folding]\nbogus = 1\n', "no option 'bogus'; options: size_threshold"),
        ('passes = ["shape-inference"]\n[options.constant-folding]\nsize_threshold = 1\n', "names no pass"),
        ("passes = [\n", "invalid TOML"),
    ],
)
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_recipe(str(path))


def test_unknown_recipe_name_lists_the_built_ins():
    with pytest.raises(UserError, match="built-in recipes: .*cleanup"):
        load_recipe("fastest-please")


def test_every_built_in_recipe_round_trips_through_a_copied_file(tmp_path):
    """A user copies a built-in recipe file and edits it: the copy loads to the same recipe and builds."""
    from importlib.resources import files

    recipes = builtin_recipes()
    assert len(recipes) >= 15
    for name, recipe in recipes.items():
        copy = tmp_path / f"my-{name}.toml"
        copy.write_text(files("onnxsmith.recipes").joinpath(f"{name}.toml").read_text())
        loaded = load_recipe(str(copy))
        assert (loaded.passes, loaded.options, loaded.description) == (recipe.passes, recipe.options,
                                                                      recipe.description)
        assert [p.name for p in loaded.build()] == [p.name for p in recipe.build()]
