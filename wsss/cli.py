"""The ``wsss`` command: one subcommand per stage (``wsss.stages.registry``), plus ``run``,
``data-check`` and ``show-config``.

Every subcommand takes a YAML config and dotted ``group.key=value`` overrides. Bad keys or
values and bad input data stop the command with a message and exit status 1 (no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import TYPE_CHECKING, Optional

from wsss.stages import registry

if TYPE_CHECKING:
    from wsss.config import Config

# The config, the data checks and the stages import torch, Lightning and smp (seconds). They are
# imported inside the functions that run a command, after the arguments are parsed, so that
# `wsss --help` answers at once: the parser needs only the registry.


def commands() -> dict[str, str]:
    """Every subcommand with its help, in the order `wsss --help` lists them."""
    steps = ""
    for stage in registry.REGISTRY:
        step = f"-> {stage.command}" if steps else stage.command
        steps += f" [{step}]" if stage.optional else f" {step}"
    return {
        "run": f"all stages ({steps.strip()}), resumable",
        **{stage.command: stage.help for stage in registry.REGISTRY},
        "data-check": "load every item of the configured splits and report counts and bad files",
        "show-config": "print the resolved config (or every key with --keys)",
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Weakly-supervised semantic segmentation "
        "from image-level labels with multi-layer Relevance-CAM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in commands().items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == "show-config":
            sub.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
            sub.add_argument(
                "--keys", action="store_true", help="list every key, its type and choices"
            )
        else:
            sub.add_argument("config", help="YAML config, e.g. configs/default.yaml")
        sub.add_argument("overrides", nargs="*", metavar="group.key=value", help="config overrides")
    return parser


def _data_check(cfg: Config) -> int:
    # lazy, like every heavy import here: `wsss --help` stays fast without torch
    from wsss.data.check import check_source, format_report
    from wsss.data.datamodule import build_source

    d = cfg.data
    splits = [d.train_split, d.val_split] + ([d.test_split] if d.test_split else [])
    failed = False
    for split in dict.fromkeys(splits):
        report = check_source(build_source(cfg, split))
        print(format_report(report, split))
        failed = failed or report.total_problems > 0
    return 1 if failed else 0


def _run_command(command: str, cfg: Config) -> int:
    """``wsss run`` (every stage) or one stage's subcommand."""
    from wsss import pipeline  # lazy: importing the stages takes seconds

    if command == "run":
        pipeline.run_all(cfg)
    else:
        pipeline.run_one(cfg, {stage.command: stage for stage in registry.REGISTRY}[command])
    return 0


def _quiet_third_party() -> None:
    """Drop what Lightning and torch repeat on every stage and that says nothing about the run:
    Lightning's product tips and torch's ``_pytree`` deprecation notice (from Lightning)."""
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning
    )
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "Tip:" not in record.getMessage()
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_third_party()
    try:
        code = _main(args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # `wsss show-config --keys | head`: the reader left, nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def original_message(exc: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back wrapped in the
    worker's whole traceback; only its last line (``SomeError: message``) is the message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    prefix = f"{type(exc).__name__}: "
    tail = (
        text[text.rfind(prefix) + len(prefix) :]
        if prefix in text
        else text.strip().splitlines()[-1]
    )
    return tail.strip()


def filesystem_message(exc: OSError, cfg: Optional[Config]) -> str:
    """One line for a file that cannot be written or a folder in the way, with the fix."""
    path = exc.filename or "a path"
    where = f" (run.dir={cfg.run.dir}, run.name={cfg.run.name})" if cfg is not None else ""
    if isinstance(exc, PermissionError):
        fix = f"make it writable, or choose a writable run.dir{where}"
    elif isinstance(exc, NotADirectoryError):
        fix = f"a file stands where a folder is needed: move it, or choose another run.dir / run.name{where}"
    elif isinstance(exc, FileExistsError):
        fix = f"a file or folder of that name is in the way: move it, or choose another run.name{where}"
    else:
        fix = f"check the disk and the path{where}"
    return f"cannot write {path}: {exc.strerror or exc}; {fix}"


def _main(args: argparse.Namespace) -> int:
    # lazy, after parsing: the config pulls in torch, smp and Lightning, which --help never needs
    from wsss.config import ConfigError, describe_keys, load_config
    from wsss.data.imageio import DataError
    from wsss.models.common import NonFiniteLossError
    from wsss.stages.records import StageError

    cfg: Optional[Config] = None
    try:
        if args.command == "show-config":
            if args.keys:
                print(describe_keys())
                return 0
            print(load_config(args.config, args.overrides).to_yaml(), end="")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "data-check":
            return _data_check(cfg)
        return _run_command(args.command, cfg)
    except (ConfigError, DataError, StageError, NonFiniteLossError) as exc:
        print(f"wsss {args.command}: error: {original_message(exc)}", file=sys.stderr)
        return 1
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
        print(f"wsss {args.command}: error: {filesystem_message(exc, cfg)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
