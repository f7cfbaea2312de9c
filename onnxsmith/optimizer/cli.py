"""The ``optimize`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pathlib import Path

from onnxsmith import __version__
from onnxsmith.backends.tensorrt import build_engine, measure_latency, require_tensorrt
from onnxsmith.core.errors import PassError, UserError
from onnxsmith.models.zoo import DEFAULT_ZOO_MODEL, get_zoo_model, zoo_names
from onnxsmith.optimizer.inspect_sparsity import COMMAND as INSPECT_SPARSITY, build_inspect_parser, run_inspect
from onnxsmith.optimizer.lint_trt import COMMAND as LINT_TRT, build_lint_parser, report_lines, run_lint, summary_line
from onnxsmith.optimizer.manager import PassRecord
from onnxsmith.optimizer.pipeline import OptimizeResult, engine_feeds, optimize_file, plan
from onnxsmith.core.options import OptionError, OptionSpec
from onnxsmith.optimizer.aliases import ALIASES, Alias
from onnxsmith.optimizer.explain import COMMAND as EXPLAIN, build_explain_parser, recipe_lines, run_explain
from onnxsmith.optimizer.recipes import DEFAULT_RECIPE, builtin_recipes
from onnxsmith.optimizer.registry import PASSES

EXAMPLES = f"""\
examples:
  optimize zoo:{DEFAULT_ZOO_MODEL}                      export a zoo model, clean it up, evaluate it
  optimize model.onnx                            write model.opt.onnx with the '{DEFAULT_RECIPE}' recipe
  optimize model.onnx -o out.onnx --report rep/  also write rep/report.json and rep/report.md
  optimize model.onnx --calib data.npz           verify on your own inputs (one array per input)
  optimize zoo:minilm --recipe w8a8 --calibrator percentile   INT8 QDQ, uint8 activations
  optimize model.onnx --recipe w8a8 --act-dtype int8 --exclude lm_head --calib data.npz
  optimize zoo:vit-digits --recipe ptq4vit --wbits 6 --abits 6   PTQ4ViT (Hessian search + twin-uniform)
  optimize zoo:minilm --recipe base-ptq --wbits 4 --abits 8 --metric mse
  optimize zoo:minilm --recipe ptq-sl --wbits 4 --grid 64x2   PTQ-SL: reorder channels + sub-layer weight grid
  optimize model.onnx --recipe my.toml --dry-run list the passes a recipe file would run
  optimize --list-recipes [-v] | --list-zoo     recipes (-v: with every pass and option)
  optimize explain w8a8                          a recipe's passes, options, defaults and the flags that set them
  optimize zoo:minilm --recipe w8a8 --set int8-qdq.percentile=99.99 --calibrator percentile
  optimize zoo:smollm2 --recipe esparse24 --alpha 10   E-Sparse 2:4 with channel shuffles (head kept dense)
  optimize zoo:minilm --recipe wanda24 --nm 4:8    Wanda 4:8 sparsity
  optimize inspect-sparsity model.onnx [--json]  which GEMM weights are 2:4 / 4:8 sparse on the input axis
  optimize lint-trt model.opt.onnx [--json]      can TensorRT 10 parse it and run its Q/DQ as intended?
  optimize zoo:minilm --recipe w8a8 --act-dtype int8 --engine minilm.plan   build a TensorRT engine too
  optimize zoo:smollm2 --recipe int4-awq --block-size 64           INT4 weight-only, AWQ scaling (TensorRT form)
  optimize zoo:smollm2 --recipe int4-wo --block-size 32 --target onnxruntime   MatMulNBits
  optimize zoo:minilm --recipe w4a8 --learn-steps 100   INT4 weights + INT8 activations, learned steps
  optimize zoo:minilm --recipe w4a4-kd           W4A4, LSQ steps distilled layer by layer
  optimize zoo:moe-tiny --recipe moe-w8a8 --kv-cache int8   MoE W8A8 (experts on routed tokens) + int8 KV cache
  optimize zoo:minilm --recipe w8a8 --target-metric 'cos>=0.995' --time-budget 300
                                                 keep the fewest sensitive layers float until the target holds
  optimize model.onnx --recipe w8a8 --calib data.npz --target-metric 'sqnr>=30'   (files: output SQNR in dB)

exit codes: 0 success, 1 a pass failed or broke the model, 2 bad input (one-line message; --debug for a trace)
  (--target-metric: 0 also when the target is not met; the best model is saved, report.json says target_met)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimize",
        description="Rewrite an ONNX model with verified passes (onnxsmith).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="an .onnx file, or zoo:NAME for a built-in model")
    parser.add_argument("-o", "--output", help="output file (default: IN.opt.onnx; ./NAME.opt.onnx for zoo)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="built-in recipe name or a .toml recipe file")
    parser.add_argument("--calib", metavar="PATH",
                        help="calibration data: .npz (one array per input, first axis = samples) or a folder of "
                             ".npz files (one feed each)")
    parser.add_argument("--report", metavar="DIR", help="write report.json, report.md and report.html (plots) into DIR")
    parser.add_argument("--dry-run", action="store_true", help="list the planned passes and exit")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check of lossless passes")
    parser.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare FP32 and optimized models (default: on for zoo models)",
    )
    add_alias_arguments(parser)
    parser.add_argument("--set", metavar="PASS.OPTION=VALUE", action="append", default=[], dest="set_options",
                        help="set one declared option of one pass of the recipe (repeatable), e.g. "
                             "--set int8-qdq.percentile=99.99; 'optimize explain RECIPE' lists them")
    mixed = parser.add_argument_group("accuracy-driven mixed precision (keep the most sensitive layers float)")
    mixed.add_argument("--target-metric", metavar="EXPR",
                       help="e.g. cos>=0.995, ppl<=18, accuracy>=0.98, top1_agreement>=0.99, sqnr>=30 (dB, first "
                            "output); searches the fewest float layers meeting it")
    mixed.add_argument("--time-budget", type=_positive_float, metavar="SECONDS", default=None,
                       help="stop the --target-metric search when another attempt would exceed this (default 600)")
    engine = parser.add_argument_group("TensorRT engine (needs TensorRT 10 and a CUDA GPU)")
    engine.add_argument("--engine", metavar="OUT.plan", help="also build a TensorRT engine from the output")
    engine.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to load and update")
    engine.add_argument("--engine-latency", action="store_true", help="measure the engine's latency on one feed")
    parser.add_argument("--list-recipes", action="store_true",
                        help="list the built-in recipes (with -v: their passes and options)")
    parser.add_argument("--list-zoo", action="store_true", help="list the zoo models")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="print debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"onnxsmith {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimize`` (and of ``optimize inspect-sparsity``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [INSPECT_SPARSITY]:
        inspect_args = build_inspect_parser().parse_args(argv[1:])
        return _guarded(lambda: run_inspect(inspect_args), inspect_args.debug)
    if argv[:1] == [EXPLAIN]:
        explain_args = build_explain_parser().parse_args(argv[1:])
        return _guarded(lambda: run_explain(explain_args), explain_args.debug)
    if argv[:1] == [LINT_TRT]:
        lint_args = build_lint_parser().parse_args(argv[1:])
        return _guarded(lambda: run_lint(lint_args), lint_args.debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    return _guarded(lambda: _run(args, parser), args.debug)


def _guarded(command: Callable[[], int], debug: bool) -> int:
    """Run ``command``; bad input and failed passes become a one-line message and exit code 2 or 1."""
    try:
        return command()
    except UserError as exc:
        if debug:
            raise
        print(f"optimize: error: {exc}", file=sys.stderr)
        return 2
    except PassError as exc:
        if debug:
            raise
        print(f"optimize: pass failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("optimize: interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.list_recipes:
        for name, recipe in builtin_recipes().items():
            if args.verbose:
                print("\n".join(recipe_lines(recipe, with_help=False)))
            else:
                print(f"{name:16} {recipe.description}")
        return 0
    if args.list_zoo:
        for name in zoo_names():
            print(_zoo_line(name))
        return 0
    if args.model is None:
        parser.print_usage(sys.stderr)
        raise UserError("give a model (.onnx file or zoo:NAME), or --list-recipes / --list-zoo")
    pass_options = _pass_options(args)
    if args.dry_run:
        for index, p in enumerate(plan(args.model, args.recipe, pass_options), 1):
            kind = "lossless" if p.lossless else "lossy"
            print(f"{index:2}. {p.name:28} {kind:9} {p.description}")
        return 0
    if args.engine:
        require_tensorrt()  # before the optimization, so a missing TensorRT costs nothing
    say = _printer(args.quiet)
    if args.target_metric is None and args.time_budget is not None:
        raise UserError("--time-budget needs --target-metric")
    if args.target_metric is not None:
        return _run_search(args, pass_options, say)
    result = optimize_file(
        args.model,
        args.output,
        recipe=args.recipe,
        calib=args.calib,
        pass_options=pass_options,
        verify=not args.no_verify,
        evaluate_model=args.evaluate,
        on_record=lambda record: say(_record_line(record)),
        progress=not args.quiet,
    )
    if args.report:
        from onnxsmith.optimizer.report import write_report

        json_path, _ = write_report(result, args.report)
        say(f"report: {json_path.parent}/report.{{json,md,html}}")
    _summary(result, say)
    if args.engine:
        _build_engine(result, args, say)
    return 0


def _run_search(args: argparse.Namespace, pass_options: dict[str, object], say) -> int:
    """``--target-metric``: the mixed-precision search; prints one line per attempt and the verdict. Exit 0 even
    when the target is missed (the best model is saved; the verdict line and report.json say so)."""
    from onnxsmith.optimizer import mixed_precision

    target = mixed_precision.Target.parse(args.target_metric)
    if args.evaluate is False:
        raise UserError("--target-metric needs the evaluation; drop --no-evaluate")
    say(f"mixed precision: target {target}, time budget "
        f"{args.time_budget or mixed_precision.DEFAULT_TIME_BUDGET:g} s")
    attempts = []

    def on_attempt(attempt) -> None:
        attempts.append(attempt)
        say(mixed_precision.attempt_line(len(attempts), attempt, target))

    found = mixed_precision.search(
        args.model, args.output, args.recipe, target, calib=args.calib, pass_options=pass_options,
        time_budget=args.time_budget or mixed_precision.DEFAULT_TIME_BUDGET, verify=not args.no_verify,
        on_attempt=on_attempt, on_record=lambda record: say(_record_line(record)), progress=not args.quiet)
    result = found.result
    if args.report:
        from onnxsmith.optimizer.report import write_report

        json_path, _ = write_report(result, args.report)
        mixed_precision.write_report_section(args.report, found)
        say(f"report: {json_path.parent}/report.{{json,md,html}}")
    _summary(result, say)
    say(f"search: {len(found.attempts)} attempts in {found.seconds:.1f} s (the timings above are the saved attempt's)")
    if found.excluded:
        say(f"float layers: {', '.join(found.excluded)}")
    print(found.verdict(), file=sys.stderr)
    if args.engine:
        _build_engine(result, args, say)
    return 0


def _build_engine(result: OptimizeResult, args: argparse.Namespace, say) -> None:
    """Build the TensorRT engine of the written model with a profile from the calibration feeds' shapes."""
    feeds = engine_feeds(result, args.calib)
    report = build_engine(result.output_path, args.engine, [{k: v.shape for k, v in f.items()} for f in feeds],
                          timing_cache=Path(args.timing_cache) if args.timing_cache else None)
    say(f"engine: {report.engine_path} in {report.seconds:.1f} s (network {', '.join(report.network_flags) or '-'};"
        f" flags {', '.join(report.builder_flags) or '-'})")
    for name, (low, opt, high) in report.profile.items():
        say(f"  profile {name}: min {low} opt {opt} max {high}")
    say(f"  {report.layers.line()}")
    if report.sparse_layers and not report.layers.sparse_tactics:
        say("  note: 2:4 layers found but no sparse tactic picked (the sparse-gemm-to-conv form helps)")
    if args.engine_latency:
        latency = measure_latency(args.engine, feeds[0])
        say(f"  TensorRT latency: median {latency['median_ms']:.3f} ms, p90 {latency['p90_ms']:.3f} ms")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def add_alias_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per declared alias, typed and checked by its first target's declaration."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for alias in ALIASES:
        group = groups.get(alias.group) or groups.setdefault(alias.group, parser.add_argument_group(alias.group))
        spec = PASSES[alias.passes[0]].Options.spec(alias.options[0])
        help_text = alias.help or f"{spec.help} ({', '.join(alias.passes)})"
        if alias.action in ("store_true", "boolean"):
            action = "store_true" if alias.action == "store_true" else argparse.BooleanOptionalAction
            group.add_argument(alias.flag, dest=alias.name, action=action, default=None, help=help_text)
            continue
        if alias.action == "append":
            group.add_argument(alias.flag, dest=alias.name, action="append", default=None, metavar=alias.metavar,
                               help=help_text)
            continue
        choices = list(spec.choices) if spec.choices is not None and spec.kind == "str" else None
        group.add_argument(alias.flag, dest=alias.name, type=_alias_type(alias, spec), choices=choices,
                           metavar=alias.metavar or _metavar(spec), help=help_text)


def _alias_type(alias: Alias, spec: OptionSpec):
    def convert(text: str):
        try:
            return alias.parse(text) if alias.parse is not None else spec.validate(spec.parse(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _metavar(spec: OptionSpec) -> str | None:
    if spec.choices is not None and spec.kind == "str":
        return None
    if spec.choices is not None:
        return "{" + ",".join(map(str, spec.choices)) + "}"
    if spec.minimum is not None and spec.maximum is not None:
        return f"{{{spec.minimum:g}..{spec.maximum:g}}}"
    return spec.kind.upper()


def _pass_options(args: argparse.Namespace) -> dict[str, object]:
    """The aliases the user gave, by name, and the ``--set`` values as per-pass tables."""
    options: dict[str, object] = {alias.name: getattr(args, alias.name) for alias in ALIASES
                                  if getattr(args, alias.name) is not None}
    tables: dict[str, dict[str, object]] = {}
    for text in args.set_options:
        target, equals, value = text.partition("=")
        pass_name, dot, option_name = target.partition(".")
        if not equals or not dot:
            raise UserError(f"--set {text!r}: give PASS.OPTION=VALUE, e.g. int8-qdq.calibrator=entropy")
        if pass_name not in PASSES:
            raise UserError(f"--set {text!r}: unknown pass {pass_name!r}; passes: {', '.join(sorted(PASSES))}")
        try:
            spec = PASSES[pass_name].Options.spec(option_name)
            parsed = spec.validate(spec.parse(value))
        except OptionError as exc:
            raise UserError(f"--set {text!r}: pass {pass_name!r}: {exc}") from None
        tables.setdefault(pass_name, {})[option_name] = parsed
    return {**options, **tables}


def _zoo_line(name: str) -> str:
    try:
        model = get_zoo_model(name)
    except UserError as exc:
        return f"{name:12} (unavailable: {exc})"
    extra = f"  [needs onnxsmith[{model.extra}]]" if model.extra else ""
    return f"{name:12} {model.description}; metric: {model.metric}{extra}"


def _printer(quiet: bool):
    def say(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr)

    return say


def _record_line(record: PassRecord) -> str:
    changes = ", ".join(f"{k}={v}" for k, v in record.changes.items())
    verified = ""
    if record.verification:
        verified = f"  verified max|Δ|={record.verification['max_abs_error']:.2g}"
    state = "changed" if record.modified else "no change"
    if record.skipped:
        state, changes = "skipped", record.skipped
    return f"  {record.name:28} {record.seconds:7.2f} s  {state:9} {changes}{verified}"


def _summary(result: OptimizeResult, say) -> None:
    say(f"wrote {result.output_path} in {result.seconds:.1f} s ("
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.timings().items() if name != "total")
        + ")")
    if result.unverified_reason:
        say(f"note: lossless passes were not verified ({result.unverified_reason})")
    if result.trt_lint is not None:
        hints = " (optimize lint-trt OUT.onnx --info shows the hints)" if any(
            f.severity == "info" for f in result.trt_lint) else ""
        say(summary_line(result.trt_lint) + hints)
        for line in report_lines([f for f in result.trt_lint if f.severity != "info"]):
            say(f"  {line}")
    evaluation = result.evaluation
    if evaluation is None:
        return
    say(f"evaluation on {evaluation.feeds} feeds:")
    for key, value in evaluation.metrics.items():
        say(f"  {key:24} {value:.4f}")
    if evaluation.routing_agreement is not None:
        say(f"  {'routing_agreement':24} {evaluation.routing_agreement:.4f}")
    for name, value in evaluation.output_sqnr_db.items():
        say(f"  SQNR {name:19} {value:.1f} dB")
    say(f"  latency (ms)             FP32 {evaluation.latency_ms['reference']:.2f}  "
        f"optimized {evaluation.latency_ms['candidate']:.2f}")
    say(f"  size (MB)                FP32 {evaluation.size_bytes['reference'] / 1e6:.2f}  "
        f"optimized {evaluation.size_bytes['candidate'] / 1e6:.2f}")


if __name__ == "__main__":
    sys.exit(main())
