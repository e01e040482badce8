"""Command line of the `jobs/` entrypoints: `--config FILE [key=value ...]`, parsed the same way everywhere."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pydantic import BaseModel

from mfr_ray.config.base import ConfigError
from mfr_ray.config.loader import load_config


def parse_job_args(
    description: str,
    expected: type[BaseModel],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[BaseModel, argparse.Namespace]:
    """Parse the job's arguments and load its config; a bad config exits 2 with the key and file named."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (configs/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for sections")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides, expected=expected), args
    except ConfigError as exc:
        parser.exit(2, f"{exc}\n")
