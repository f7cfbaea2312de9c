"""What the ``optimize`` subcommands share: a parser with the usual description, examples and exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

BAD_INPUT = "exit codes: 0 success, 2 bad input (one-line message; --debug for a trace)"


def subcommand_parser(command: str, description: str, examples: Sequence[tuple[str, str]], extra_epilog: str = "",
                      exit_codes: str = BAD_INPUT) -> argparse.ArgumentParser:
    """The parser of ``optimize COMMAND``: ``examples`` are (arguments, what it does) pairs; ``--debug`` is added."""
    width = max(len(arguments) for arguments, _ in examples)
    lines = "\n".join(f"  optimize {command} {arguments:{width}}  {text}".rstrip() for arguments, text in examples)
    parser = argparse.ArgumentParser(
        prog=f"optimize {command}",
        description=description,
        epilog=f"{extra_epilog}examples:\n{lines}\n\n{exit_codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser
