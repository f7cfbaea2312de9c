"""Global option aliases: the short command-line flags (``--wbits``, ``--nm 2:4``, ``--exclude``) that set named
options of named passes.

Each alias lists the passes and the option names it sets; in a run it sets them in the recipe's passes among
those and in no other pass, and a recipe holding none of them refuses it. Its value type, choices and help come
from the first target's declaration (:mod:`onnxsmith.core.options`), so nothing here repeats a choice list.
The Python API takes the same names as ``pass_options`` keys (``{"wbits": 4, "nm": (2, 4)}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

QUANTIZATION = "quantization (override the recipe's quantizing passes)"
INT4 = "INT4 and learned steps (int4-wo, int4-awq, int4-gptq, w4a8, w4a4-kd)"
MOE = "mixture-of-experts and KV cache (moe-w8a8)"
SPARSITY = "sparsity (override the recipe's N:M passes)"

INT8_PASSES = ("int8-qdq", "moe-qdq", "ptq-qdq")
NM_PASSES = ("prune-nm", "shuffle-nm")
INT4_PASSES = ("int4-weight", "awq-scale")


@dataclass(frozen=True)
class Alias:
    """A flag setting ``options`` of ``passes``; ``action`` is argparse's (``store``, ``store_true``, ``boolean``
    for ``--x/--no-x``, ``append``); ``parse`` turns the flag's text into the value (default: the declaration's
    parser), a tuple with one entry per option when ``options`` has several."""

    name: str
    flag: str
    passes: tuple[str, ...]
    options: tuple[str, ...]
    group: str
    action: str = "store"
    metavar: str | None = None
    help: str | None = None
    parse: Callable[[str], Any] | None = None

    def targets(self) -> list[str]:
        """``pass.option`` for every option the alias can set."""
        return [f"{p}.{o}" for p in self.passes for o in self.options]

    def values(self, value: Any) -> dict[str, Any]:
        """Option name -> value for one target pass."""
        if len(self.options) == 1:
            return {self.options[0]: value}
        if isinstance(value, str) and self.parse is not None:
            value = self.parse(value)
        if not isinstance(value, (tuple, list)) or len(value) != len(self.options):
            raise ValueError(f"{self.name!r} takes {len(self.options)} values ({', '.join(self.options)}), "
                             f"got {value!r}")
        return dict(zip(self.options, value))


def parse_pattern(text: str) -> tuple[int, int]:
    """``"N:M"`` as ``(n, m)``; raises ValueError unless ``0 < n < m``."""
    n, _, m = text.partition(":")
    if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"must be N:M with 0 < N < M, e.g. 2:4, got {text!r}")
    return int(n), int(m)


ALIASES: tuple[Alias, ...] = (
    Alias("act_dtype", "--act-dtype", INT8_PASSES, ("act_dtype",), QUANTIZATION),
    Alias("calibrator", "--calibrator", ("int8-qdq", "moe-qdq"), ("calibrator",), QUANTIZATION),
    Alias("wbits", "--wbits", ("ptq-qdq", "reorder-channels"), ("wbits",), QUANTIZATION,
          help="weight bits (base-ptq, ptq4vit, ptq-sl)"),
    Alias("abits", "--abits", ("ptq-qdq",), ("abits",), QUANTIZATION),
    Alias("metric", "--metric", ("ptq-qdq",), ("metric",), QUANTIZATION),
    Alias("twin", "--twin", ("int8-qdq", "ptq-qdq"), ("twin",), QUANTIZATION, action="boolean"),
    Alias("twin_form", "--twin-form", ("int8-qdq", "ptq-qdq"), ("twin_form",), QUANTIZATION),
    Alias("weight_grid", "--grid", ("ptq-qdq", "reorder-channels"), ("weight_grid",), QUANTIZATION,
          metavar="NVxNH"),
    Alias("act_groups", "--act-groups", ("ptq-qdq",), ("act_groups",), QUANTIZATION, metavar="N"),
    Alias("weight_only", "--weight-only", ("ptq-qdq",), ("weight_only",), QUANTIZATION, action="store_true"),
    Alias("strategy", "--reorder", ("reorder-channels",), ("strategy",), QUANTIZATION),
    Alias("loss", "--loss", ("ptq-qdq",), ("loss",), QUANTIZATION),
    Alias("exclude_regex", "--exclude", (*INT8_PASSES, *INT4_PASSES, *NM_PASSES, "sparse-gemm-to-conv"),
          ("exclude_regex",), QUANTIZATION, action="append", metavar="REGEX",
          help="keep nodes whose name matches REGEX float / dense (repeatable), e.g. 'lm_head|router'"),
    Alias("exclude_ops", "--exclude-op", INT8_PASSES, ("exclude_ops",), QUANTIZATION, action="append",
          metavar="OP", help="keep nodes of this op type in float (repeatable)"),
    Alias("block_size", "--block-size", (*INT4_PASSES, "ptq-qdq"), ("block_size",), INT4, metavar="N"),
    Alias("target", "--target", INT4_PASSES, ("target",), INT4),
    Alias("method", "--int4-method", ("int4-weight",), ("method",), INT4),
    Alias("learn_steps", "--learn-steps", ("ptq-qdq", "int4-weight"), ("learn_steps",), INT4, metavar="N"),
    Alias("scale_gradient", "--scale-gradient", ("ptq-qdq", "int4-weight"), ("scale_gradient",), INT4),
    Alias("kv_cache", "--kv-cache", ("kv-cache-qdq",), ("kv_cache",), MOE),
    Alias("granularity", "--kv-granularity", ("kv-cache-qdq",), ("granularity",), MOE),
    Alias("min_expert_tokens", "--min-expert-tokens", ("moe-qdq",), ("min_expert_tokens",), MOE, metavar="N"),
    Alias("expert_fallback", "--expert-fallback", ("moe-qdq",), ("expert_fallback",), MOE),
    Alias("quantize_router", "--quantize-router", ("moe-qdq",), ("quantize_router",), MOE, action="store_true"),
    Alias("nm", "--nm", (*NM_PASSES, "sparse-gemm-to-conv"), ("n", "m"), SPARSITY, metavar="N:M",
          help="sparsity pattern: keep N of every M input channels (2:4, 4:8)", parse=parse_pattern),
    Alias("score", "--prune-score", NM_PASSES, ("score",), SPARSITY),
    Alias("alpha", "--alpha", NM_PASSES, ("alpha",), SPARSITY, metavar="A"),
    Alias("shuffle", "--shuffle", ("shuffle-nm",), ("shuffle",), SPARSITY),
    Alias("absorb", "--absorb", ("shuffle-nm",), ("absorb",), SPARSITY),
)
ALIASES_BY_NAME = {alias.name: alias for alias in ALIASES}
