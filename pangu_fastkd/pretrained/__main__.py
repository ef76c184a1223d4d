"""``python -m pangu_fastkd.pretrained``: list the shipped models, or ship a teacher a run trained.

    python -m pangu_fastkd.pretrained list
    python -m pangu_fastkd.pretrained ship RUN_DIR TEACHER NAME --command "python -m ..."

``ship`` copies ``RUN_DIR/teachers/TEACHER/model`` (the weights and config) to
``pangu_fastkd/pretrained/NAME/`` and writes ``recipe.json``: the command that trained it, the
run's resolved config (data recipe, seeds, steps), the teacher's eval row and the sha256 of each
file, which ``resolve_model_path`` checks on every use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

from ..durable import atomic_write_text, fsync_tree, replace_dir, sha256_file
from . import PRETRAINED_DIR, RECIPE, builtin_names, is_valid_name, read_recipe

MODEL_FILES = ("config.json", "model.safetensors")


def ship(run_dir: Path, teacher: str, name: str, command: str) -> Path:
    """Copies a trained teacher into the package; returns its new directory."""
    if not is_valid_name(name):
        raise ValueError(f"name {name!r}: use lower-case letters, digits, '-', '_' or '.'")
    source = run_dir / "teachers" / teacher
    done = source / "done.json"
    if not done.is_file():
        raise FileNotFoundError(f"{done}: the run has not finished training teacher {teacher!r}")
    record = json.loads(done.read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    eval_row = record["eval"]  # with its per-problem outcomes, which the tests re-check
    target = PRETRAINED_DIR / name
    with tempfile.TemporaryDirectory(dir=PRETRAINED_DIR, prefix=f".{name}.") as tmp:
        staged = Path(tmp) / name
        staged.mkdir()
        for filename in MODEL_FILES:
            shutil.copyfile(source / "model" / filename, staged / filename)
        recipe = {
            "name": name,
            "command": command,
            "teacher": teacher,
            "teacher_spec": config["teachers"][teacher],
            "data": config["data"],
            "seed": config["seed"],
            "eval": eval_row,
            "train_accuracy": record.get("train_accuracy"),
            "train_seconds": record.get("seconds"),
            "shipped": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "files": {f: sha256_file(staged / f) for f in MODEL_FILES},
        }
        atomic_write_text(staged / RECIPE, json.dumps(recipe, indent=1) + "\n")
        fsync_tree(staged)
        replace_dir(staged, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pangu_fastkd.pretrained")
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("list", help="the shipped models and how each was made")
    ship_cmd = commands.add_parser("ship", help="copy a teacher a run trained into the package")
    ship_cmd.add_argument("run_dir", type=Path)
    ship_cmd.add_argument("teacher", help="the [teachers.<name>] the run trained")
    ship_cmd.add_argument("name", help="the shipped name (used as builtin:<name>)")
    ship_cmd.add_argument("--command", required=True, help="the command that trained it")
    args = parser.parse_args(argv)
    if args.action == "list":
        for name in builtin_names():
            recipe = read_recipe(name)
            print(f"builtin:{name}  {recipe.get('command', '')}")
        return 0
    try:
        target = ship(args.run_dir, args.teacher, args.name, args.command)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"shipped {target} ({', '.join(MODEL_FILES)}, {RECIPE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
