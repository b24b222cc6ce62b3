"""`stablekd` command line: quickstart, run, stage, status, keys, ds-config show|check|estimate.

    stablekd quickstart [key=value ...]                  the embedded default pipeline (configs/quickstart.yaml)
    stablekd run CONFIG [key=value ...]                  every stage of the pipeline, skipping finished ones
    stablekd run CONFIG --stages teacher,distill         only those stages (always in pipeline order)
    stablekd stage NAME CONFIG [key=value ...]           one stage (resumes from its last complete checkpoint)
    stablekd status RUN_DIR                              per stage: done / resumable at step N / not started
    stablekd keys                                        every config key with its type, default and meaning
    stablekd ds-config show|check|estimate CONFIG [--stage teacher] [--out PATH] [key=value ...]
                                                          resolved in memory: writes nothing unless --out

quickstart, run and stage take:
    --dry-run   print each command they would start (one shell line each) and the stages they would skip
                as done; start nothing, write nothing
    --verbose   show every line of DeepSpeed, PyTorch and the ranks; by default those go only to
                runs/<name>/logs/<stage>.log and the terminal shows one line as each stage starts, one as it
                ends (wall time, headline figures) and rank 0's progress bar
After quickstart or run with the evaluate stage, the report's table is printed (eval/report.md).
Config errors print one line naming the key or file and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
from pathlib import Path

from stablekd.data_pipeline.errors import DataError
from stablekd.data_pipeline.files import atomic_write
from stablekd.launcher import models, placement, rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig, describe, load_config
from stablekd.launcher.driver import pipeline, prepare
from stablekd.launcher.driver.status import format_status, report_table, run_status
from stablekd.launcher.stages import NAMES, REGISTRY

# The shipped package data (stablekd/configs), wherever the package is installed or edited from.
QUICKSTART = Path(str(importlib.resources.files("stablekd.configs") / "quickstart.yaml"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stablekd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quickstart", help="run the embedded default pipeline on the built-in bios corpus")
    q.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    r = sub.add_parser("run", help="run every stage of an experiment")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*")
    s = sub.add_parser("stage", help="run one stage")
    s.add_argument("name", choices=NAMES)
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    for cmd in (q, r):
        cmd.add_argument(
            "--stages",
            help=f"comma-separated subset of {','.join(NAMES)} (run in that order whatever the order given)",
        )
    for cmd in (q, r, s):
        cmd.add_argument("--dry-run", action="store_true", help="print the commands; start and write nothing")
        cmd.add_argument(
            "--verbose", action="store_true", help="every DeepSpeed/PyTorch line on the terminal"
        )
    st = sub.add_parser("status", help="where each stage of a run directory stands")
    st.add_argument("run_dir")
    sub.add_parser("keys", help="list every config key")
    d = sub.add_parser("ds-config", help="show, check or estimate a stage's resolved DeepSpeed config")
    d.add_argument("action", choices=["show", "check", "estimate"])
    d.add_argument("config")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--stage", default="teacher", choices=[s.name for s in REGISTRY if s.trains])
    d.add_argument(
        "--out",
        metavar="PATH",
        help="also write the resolved JSON to PATH (without it nothing is written, not even into the run "
        "directory, whose ds/<stage>.json only `run`/`stage` write)",
    )
    return p


def _ds_config(args: argparse.Namespace) -> None:
    """Resolve and validate in memory; never touch the run directory. A finished stage's ds/<stage>.json is
    what later stages load its checkpoint with (the soft-label stage reads teacher.json), so a `show` with
    another ds_config must not overwrite it."""
    cfg = load_config(args.config, args.overrides)
    prepare.check_files(cfg)  # what `run` refuses up front (a missing corpus, hostfile, ds JSON) too
    ds = placement.resolve_ds_config(cfg, args.stage)
    source = getattr(cfg, args.stage).ds_config
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, json.dumps(ds, indent=2) + "\n")
        print(f"stablekd: wrote {out}", file=sys.stderr)
    if args.action == "show":
        print(json.dumps(ds, indent=2))
    elif args.action == "check":
        print(
            f"ok: {args.stage}'s {source} (resolved) passes DeepSpeed's config check at world size "
            f"{placement.world_size(cfg, args.stage)} (train_batch_size {ds['train_batch_size']})"
        )
    else:
        _estimate(cfg, args.stage)


def _estimate(cfg, stage: str) -> None:
    from stablekd.ds_configs.resolve import estimate

    name, model = models.meta_model(cfg, stage)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    slots = placement.slots(cfg, stage) or placement.pool(cfg)  # distill.include: the student's own slots
    per_node, nodes = max(map(len, slots.values())), len(slots)
    print(
        f"{name}: {total / 1e6:.1f}M parameters, largest layer {largest / 1e6:.2f}M, "
        f"{per_node} ranks/node x {nodes} node(s)"
    )
    estimate(total, largest, per_node, nodes)


def select_stages(arg: str | None) -> list[str]:
    """`--stages a,b` as registry names in pipeline order (None: every stage); a ConfigError names unknown ones."""
    if arg is None:
        return list(NAMES)
    asked = [a.strip() for a in arg.split(",") if a.strip()]
    unknown = [a for a in asked if a not in NAMES]
    if unknown or not asked:
        raise ConfigError(
            f"--stages: unknown stage(s) {', '.join(map(repr, unknown)) or '(none given)'} (stages: {', '.join(NAMES)})"
        )
    return [n for n in NAMES if n in asked]


def _pipeline(cfg: ExperimentConfig, stages: list[str], args: argparse.Namespace) -> None:
    """run / quickstart / stage: the dry run's lines, or the run and where its results are."""
    if args.dry_run:
        print("\n".join(pipeline.dry_run(cfg, stages)))
        return
    pipeline.run(cfg, stages, verbose=args.verbose)
    table = report_table(cfg.run_dir) if "evaluate" in stages else None
    if table:
        print(f"{table}\n\nreport: {cfg.run_dir / 'eval' / 'report.md'}")
    elif args.cmd == "stage":
        print(f"done: {rundir.stage_dir(cfg, args.name)}")
    else:
        print(f"done: run directory {cfg.run_dir}")
    print(f"tensorboard --logdir {cfg.run_dir / 'tb'}")


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    # key=value overrides may follow an option (`run C --stages teacher a=b`): argparse leaves them over.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    try:
        if args.cmd == "keys":
            print("\n".join(describe()))
        elif args.cmd == "ds-config":
            _ds_config(args)
        elif args.cmd == "status":
            if not Path(args.run_dir).is_dir():
                raise ConfigError(f"status: {args.run_dir} is not a directory (expected a run directory)")
            print(format_status(Path(args.run_dir), run_status(Path(args.run_dir))))
        elif args.cmd == "quickstart":
            _pipeline(load_config(QUICKSTART, args.overrides), select_stages(args.stages), args)
        elif args.cmd == "run":
            _pipeline(load_config(args.config, args.overrides), select_stages(args.stages), args)
        elif args.cmd == "stage":
            _pipeline(load_config(args.config, args.overrides), [args.name], args)
    except (ConfigError, DataError) as e:
        print(f"stablekd: error: {e}", file=sys.stderr)
        sys.exit(2)


def console() -> None:
    """The `stablekd` command: main(), then exit without the interpreter's teardown, whose finalizers take
    ~0.4 s once torch and transformers are loaded (every `stablekd stage` of a job script pays it). Only
    an ordinary end or a SystemExit leaves this way; an exception's traceback takes the usual path."""
    try:
        main()
        code = 0
    except SystemExit as e:  # as the interpreter would: an int is the status, a message is printed with 1
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
