"""The ``curvlab`` command line.

Commands:

* ``curvlab compare``: every comparison section for one or more models on one batch,
  written as a report (report.md, report.html, results.json, results.csv, figures/).
  Without options it runs the built-in problem: an MLP and two small CNNs (max- and
  average-pooling) on scikit-learn's digits, nothing downloaded.
* ``curvlab spectra`` / ``curvlab damping`` / ``curvlab kfc``: the same with only the
  spectra, the damping sweep, or the KFC assumption checks (default models: the two
  CNNs).
* ``curvlab train``: training trajectories of several methods from the same start,
  with per-step compare diagnostics along one of them (:mod:`curvlab.cli.train`).
* ``curvlab list``: the valid methods, models, datasets, Fisher types and sections.

Invalid options give a one-line error naming the valid choices and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from curvlab.cli.common import Parser, UsageError, add_plugin_option, load_plugins
from curvlab.cli.compare import (
    COMMANDS,
    add_compare_options,
    resolve_config,
    run_compare_command,
)
from curvlab.cli.train import add_train_parser, resolve_train_config, run_train_command
from curvlab.compare.methods import METHODS
from curvlab.compare.run import SECTIONS
from curvlab.data import DATASETS
from curvlab.losses import FISHER_TYPES
from curvlab.methods import TRAIN_METHODS
from curvlab.models import MODELS

_DESCRIPTION = """\
Curvature diagnostics: compare the exact subsampled Fisher/GGN with block-diagonal,
KFAC (heuristic and standard damping), FOOF, EKFAC and other approximations on one
batch, from one forward and one backward pass per model, and write a report.

sections (--sections):
  cosine          cosine of update directions, every pair, per layer, Euclidean and
                  in a curvature's inner product (--inner)
  relative_error  ||C - F|| / ||F|| against the exact Fisher, per layer and network
  spectrum        exact and approximate spectra, top-k eigenspace overlap
  damping         over the λ grid: heuristic vs standard damping, KFAC vs FOOF,
                  cross terms of heuristic damping, effective step sizes
  progress        relative mini-batch loss decrease after one step of each method
  kfc_check       KFC assumptions (IAD, SH, SUD) per conv layer, spatial correlations

report (--out): report.md, report.html (self-contained), results.json (config,
versions, device, seed, every record), results.csv, figures/ (PNG and PDF)."""

_EPILOG = """\
'curvlab compare' alone runs the built-in problem (an MLP and max-/average-pooling
CNNs on scikit-learn's digits; nothing is downloaded). 'curvlab train' trains SGD,
exact natural gradient, KFAC and FOOF on it. 'curvlab <command> --help'
lists the options; 'curvlab list' the valid methods, models and datasets."""


def build_parser() -> argparse.ArgumentParser:
    """The ``curvlab`` argument parser with its subcommands."""
    parser = Parser(
        prog="curvlab",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    for name, (help_text, sections, models, out) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_compare_options(p, sections, models, out)
    add_train_parser(sub)
    listing = sub.add_parser(
        "list", help="list valid methods, models, datasets, Fisher types, sections"
    )
    add_plugin_option(listing)
    return parser


def _list() -> str:
    lines = ["methods:"]
    lines += [f"  {m.name:<15} {m.summary}" for m in METHODS.values()]
    lines += [
        f"models:   {', '.join(MODELS)} (or package.module:function)",
        f"datasets: {', '.join(DATASETS)}",
        f"fisher:   {', '.join(FISHER_TYPES)}",
        f"sections: {', '.join(SECTIONS)}",
        "training methods (curvlab train; default hyperparameters):",
    ]
    for name, method in TRAIN_METHODS.items():
        hp = ", ".join(f"{k}={v}" for k, v in method.defaults.items())
        lines.append(f"  {name:<15} {method.train_summary} [{hp}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` script; returns the exit code."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            where = f"curvlab {args.command}" if args.command else "curvlab"
            raise UsageError(f"{where}: error: unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "list":
            load_plugins(args.plugin)
            print(_list())
            return 0
        if args.command == "train":
            return run_train_command(args, resolve_train_config(args))
        config = resolve_config(args)
        return run_compare_command(args, config)
    except UsageError as err:
        message = str(err)
        if not message.startswith("curvlab"):
            message = f"curvlab {args.command}: error: {message}"
        print(message.replace("\n", " "), file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
