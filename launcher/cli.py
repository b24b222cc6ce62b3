"""`stablekd` command line: quickstart, run, stage, keys, ds-config show|check|estimate.

    stablekd quickstart [key=value ...]                  the embedded default pipeline (configs/quickstart.yaml)
    stablekd run CONFIG [key=value ...]                  every stage of the pipeline, skipping finished ones
    stablekd stage NAME CONFIG [key=value ...]           one stage (resumes from its last complete checkpoint)
    stablekd keys                                        every config key with its type, default and meaning
    stablekd ds-config show|check|estimate CONFIG [--stage teacher] [key=value ...]
Config errors print one line naming the key or file and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stablekd.data_pipeline.sources import DataError
from stablekd.launcher import pipeline
from stablekd.launcher.config import ConfigError, describe, load_config
from stablekd.launcher.stages import NAMES, REGISTRY

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


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
    sub.add_parser("keys", help="list every config key")
    d = sub.add_parser("ds-config", help="show, check or estimate a stage's resolved DeepSpeed config")
    d.add_argument("action", choices=["show", "check", "estimate"])
    d.add_argument("config")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--stage", default="teacher", choices=[s.name for s in REGISTRY if s.trains])
    return p


def _ds_config(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    ds = pipeline.prepare_ds_config(
        cfg, args.stage
    )  # resolves, validates with DeepSpeed, writes ds/<stage>.json
    if args.action == "show":
        print(json.dumps(ds, indent=2))
    elif args.action == "check":
        print(
            f"ok: {cfg.run_dir / 'ds' / (args.stage + '.json')} passes DeepSpeed's config check at world size "
            f"{pipeline.world_size(cfg)} (train_batch_size {ds['train_batch_size']})"
        )
    else:
        _estimate(cfg, args.stage)


def _estimate(cfg, stage: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stablekd.ds_configs.resolve import estimate
    from stablekd.model.build import model_config

    name = cfg.teacher.model if stage == "teacher" else cfg.student.model  # later stages train the student
    vocab = cfg.tokenizer.vocab_size

    class _Vocab:  # the model's shape needs only the vocabulary size and special ids
        pad_token_id, bos_token_id, eos_token_id = 0, 2, 3

        def __len__(self) -> int:
            return vocab

    mcfg = (
        AutoConfig.from_pretrained(name)
        if Path(name).is_dir()
        else model_config(name, _Vocab(), cfg.data.seq_len)
    )
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(mcfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    nodes = max(1, pipeline.world_size(cfg) // cfg.launch.nproc_per_node)
    print(
        f"{name}: {total / 1e6:.1f}M parameters, largest layer {largest / 1e6:.2f}M, "
        f"{cfg.launch.nproc_per_node} ranks/node x {nodes} node(s)"
    )
    estimate(total, largest, cfg.launch.nproc_per_node, nodes)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "keys":
            print("\n".join(describe()))
        elif args.cmd == "ds-config":
            _ds_config(args)
        elif args.cmd == "quickstart":
            cfg = load_config(QUICKSTART, args.overrides)
            pipeline.run(cfg, NAMES)
            print(
                f"done: run directory {cfg.run_dir}\nTensorBoard: tensorboard --logdir {cfg.run_dir / 'tb'}"
            )
        elif args.cmd == "run":
            cfg = load_config(args.config, args.overrides)
            pipeline.run(cfg, NAMES)
            print(
                f"done: run directory {cfg.run_dir}\nTensorBoard: tensorboard --logdir {cfg.run_dir / 'tb'}"
            )
        elif args.cmd == "stage":
            cfg = load_config(args.config, args.overrides)
            pipeline.run(cfg, [args.name])
            print(f"done: {cfg.run_dir / args.name}\nTensorBoard: tensorboard --logdir {cfg.run_dir / 'tb'}")
    except (ConfigError, DataError) as e:
        print(f"stablekd: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
