"""Run a post-training pipeline.

python -m pangu_fastkd.train                      # the embedded demo (configs/default.toml)
python -m pangu_fastkd.train tiny                 # the 1-minute demo CI runs
python -m pangu_fastkd.train ablation             # the paper's ablation rows in miniature
python -m pangu_fastkd.train my.toml --set stages.0.train.steps=200
python -m pangu_fastkd.train --resume runs/default        # continue a killed run
python -m pangu_fastkd.train --resume runs/default --set logging.tensorboard=true
torchrun --standalone --nproc_per_node 2 -m pangu_fastkd.train tiny   # data parallel
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cache import CacheError
from ..distributed import init_distributed
from .config import ConfigError, load_config, load_saved_config
from .pipeline import Pipeline, RunDirError
from .replicates import run_replicates
from .run_dir import EXECUTION_KEYS, is_execution_key
from .tensorboard_log import MissingTensorBoardError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pangu_fastkd.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", help="a TOML file or a shipped config: default, tiny, ablation"
    )
    p.add_argument("--run-dir", help="where the run lives (overrides run_dir)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="discard a run already in run_dir")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. stages.0.train.steps=100 (repeatable; with "
             "--resume only settings of how the run executes: logging.*, threads)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv``; returns the exit status (2, after one ``error:`` line
    on stderr, for a bad config, data file or run directory, or a missing optional package)."""
    args = _parser().parse_args(argv)
    # --threads goes through the config's own check (a resume may change it).
    threads = [] if args.threads is None else [f"threads={args.threads}"]
    try:
        if args.resume:
            changed = [o for o in args.overrides if not is_execution_key(o.partition("=")[0])]
            if args.config or changed:
                raise ConfigError(
                    "--resume takes the run's own config: give no config, and --set only "
                    f"settings of how it executes ({', '.join(EXECUTION_KEYS)})"
                )
            saved = Path(args.resume) / "config.json"
            if not saved.is_file():
                raise RunDirError(f"--resume: {args.resume} holds no run (no config.json)")
            resumed = [*args.overrides, f"run_dir={json.dumps(args.resume)}", *threads]
            config = load_saved_config(saved, resumed)
        else:
            overrides = list(args.overrides)
            if args.run_dir:
                overrides.append(f"run_dir={json.dumps(args.run_dir)}")
            config = load_config(args.config, overrides + threads)
        if config.threads:
            torch.set_num_threads(config.threads)
        context = init_distributed("cpu")
        if config.seeds:
            run_replicates(config, context, resume=bool(args.resume), overwrite=args.overwrite)
        else:
            Pipeline(config, context, resume=bool(args.resume), overwrite=args.overwrite).run()
    except (
        ConfigError,
        RunDirError,
        CacheError,
        MissingTensorBoardError,
        ValueError,
        OSError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
