"""Declared pass options: validation, the aliases' reach, ``--set`` and ``optimize explain``."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import pytest
from onnx import TensorProto, helper

from onnxsmith.core.errors import UserError
from onnxsmith.core.options import OptionError, PassOptions, option
from onnxsmith.optimizer.aliases import ALIASES
from onnxsmith.optimizer.cli import build_parser, main
from onnxsmith.optimizer.cli import _pass_options as cli_pass_options
from onnxsmith.optimizer.recipes import builtin_recipes, load_recipe
from onnxsmith.optimizer.registry import PASSES


@dataclass(frozen=True)
class Example(PassOptions):
    count: int = option(2, "a count", minimum=1)
    ratio: float = option(0.5, "a ratio", above=0, maximum=1)
    mode: str = option("a", "a mode", choices=("a", "b"))
    flag: bool = option(False, "a flag")
    names: tuple[str, ...] = option((), "names")
    size: int | None = option(None, "a size", minimum=1)

    def check(self) -> None:
        if self.mode == "b" and self.count > 4:
            raise ValueError("mode 'b' takes count <= 4")


def test_declared_values_are_validated_and_normalised():
    options = Example(count=3, ratio=1, names=["x", "y"], size=None)
    assert options.ratio == 1.0 and isinstance(options.ratio, float) and options.names == ("x", "y")
    for values, message in [({"count": 0}, "'count' must be int >= 1"), ({"count": True}, "'count' must be int"),
                            ({"count": 2.0}, "'count' must be int"), ({"ratio": 0}, "'ratio' must be float"),
                            ({"mode": "c"}, "'mode' must be one of \\['a', 'b'\\]"), ({"flag": "yes"}, "'flag'"),
                            ({"names": "x"}, "'names' must be a list of strings"), ({"size": 0}, "'size'"),
                            ({"mode": "b", "count": 5}, "count <= 4"), ({"colour": 1}, "no option 'colour'")]:
        with pytest.raises(OptionError, match=message):
            Example.build(values)


def test_command_line_text_parses_by_declared_type():
    spec = {s.name: s for s in Example.specs()}
    assert spec["flag"].parse("on") is True and spec["flag"].parse("False") is False
    assert spec["count"].parse("7") == 7 and spec["ratio"].parse("0.25") == 0.25
    assert spec["names"].parse("a,b") == ("a", "b") and spec["size"].parse("none") is None
    with pytest.raises(OptionError, match="'count' must be int >= 1, got 'x'"):
        spec["count"].parse("x")
    assert spec["count"].describe() == "int >= 1" and spec["size"].describe() == "int >= 1 or none"


def test_every_pass_declares_its_options_and_builds_with_the_defaults():
    for name, cls in PASSES.items():
        assert cls.Options.specs() is not None
        built = cls()
        assert built.options == cls.Options() and all(spec.help for spec in cls.Options.specs()), name


def test_every_alias_reaches_declared_options_of_one_kind():
    for alias in ALIASES:
        specs = [PASSES[p].Options.spec(o) for p in alias.passes for o in alias.options]
        assert len({spec.kind for spec in specs}) == 1, alias.name


def test_builtin_recipes_validate_against_the_declarations():
    for recipe in builtin_recipes().values():
        assert [p.name for p in recipe.build()] == list(recipe.passes)


def test_a_recipe_value_the_declaration_refuses_is_a_user_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('passes = ["int8-qdq"]\n[options.int8-qdq]\ncalibrator = "median"\n')
    with pytest.raises(UserError, match="pass 'int8-qdq': option 'calibrator' must be one of"):
        load_recipe(str(path))


@pytest.fixture
def prune_and_search(tmp_path):
    recipe = tmp_path / "both.toml"
    recipe.write_text('description = "N:M then k-bit search"\npasses = ["prune-nm", "ptq-qdq"]\n'
                      '[options.prune-nm]\nn = 4\nm = 8\n')
    return recipe


def test_nm_alias_changes_prune_nm_only(prune_and_search):
    args = build_parser().parse_args(["m.onnx", "--recipe", str(prune_and_search), "--nm", "2:4"])
    prune, search = load_recipe(str(prune_and_search)).build(cli_pass_options(args))
    assert (prune.options.n, prune.options.m) == (2, 4)
    assert search.options == PASSES["ptq-qdq"].Options()  # n (search candidates) keeps its default 100
    assert search.options.n == 100


def test_alpha_and_target_aliases_skip_the_same_named_options_of_other_passes():
    search_recipe = load_recipe("base-ptq")
    with pytest.raises(UserError, match="has no pass that takes --alpha"):
        search_recipe.build({"alpha": 3.0})
    int4 = load_recipe("int4-wo").build({"target": "onnxruntime", "block_size": 32})
    assert int4[-1].options.target == "onnxruntime" and int4[-1].options.block_size == 32


def test_a_pass_table_wins_over_an_alias():
    passes = load_recipe("w8a8").build({"act_dtype": "int8", "int8-qdq": {"act_dtype": "uint8", "percentile": 99.0}})
    assert passes[-1].options.act_dtype == "uint8" and passes[-1].options.percentile == 99.0


@pytest.fixture
def model_file(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("setting, message", [
    ("int8-qdq.calibratr=mse", "--set 'int8-qdq.calibratr=mse': pass 'int8-qdq': no option 'calibratr'; "
                               "options: activation_matmuls, exclude_nodes, exclude_ops, exclude_regex, act_dtype, "
                               "calibrator, percentile, twin, twin_form, sparse_outputs"),
    ("int8-qdq.calibrator=median", "pass 'int8-qdq': option 'calibrator' must be one of "
                                   "['minmax', 'percentile', 'entropy', 'mse'], got 'median'"),
    ("int8-qdq.percentile=high", "pass 'int8-qdq': option 'percentile' must be float > 0 and <= 100, got 'high'"),
    ("int8q.percentile=99", "unknown pass 'int8q'; passes:"),
    ("int8-qdq.percentile", "give PASS.OPTION=VALUE"),
    ("prune-nm.n=2", "recipe 'w8a8' has no pass 'prune-nm'"),
])
def test_bad_set_is_one_line_exit_2(model_file, capsys, setting, message):
    assert main([str(model_file), "--recipe", "w8a8", "--set", setting, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_set_reaches_the_named_pass(model_file, tmp_path, capsys):
    args = build_parser().parse_args([str(model_file), "--recipe", "w8a8", "--set", "int8-qdq.percentile=99.9",
                                      "--set", "int8-qdq.exclude_regex=a,b", "--calibrator", "percentile"])
    quantize = load_recipe("w8a8").build(cli_pass_options(args))[-1]
    assert (quantize.options.percentile, quantize.options.exclude_regex) == (99.9, ("a", "b"))
    assert quantize.options.calibrator == "percentile"
    assert main([str(model_file), "--recipe", "w8a8", "--set", "int8-qdq.twin=true", "--dry-run"]) == 0


def test_explain_prints_every_option_with_its_value_and_flags(capsys):
    assert main(["explain", "int4-wo"]) == 0
    out = capsys.readouterr().out
    for spec in PASSES["int4-weight"].Options.specs():
        assert f"{spec.name} = " in out
    assert "*target = 'tensorrt'" in out and "--target" in out and "--set int4-weight.learn_lr=..." in out
    assert main(["explain", "no-such-recipe"]) == 2


def test_list_recipes_verbose_lists_passes_and_options(capsys):
    assert main(["--list-recipes", "-v"]) == 0
    out = capsys.readouterr().out
    assert "w8a8:" in out and "int8-qdq (lossy)" in out and "calibrator = 'minmax'" in out
    assert main(["--list-recipes"]) == 0
    assert "calibrator =" not in capsys.readouterr().out
