"""Which slots (hosts × local ranks) each stage's job runs on, and what that fixes: the world size, the
threads per rank, the resolved DeepSpeed JSON. Shared: the launching process places jobs with it, the ranks
read the world size and JSON their stage was placed with.

Every stage runs on the whole pool (launch.nproc_per_node slots on this node, or on each hostfile node up
to its slots) unless distill.include places the distill job on part of it. With distill.follow as well,
soft_labels runs on the rest of the pool, so `stablekd run` starts the two jobs side by side: the
student learns from the shards while the sharded teacher still writes them.

distill.include uses DeepSpeed's `--include` syntax: `localhost:1` (slot 1 of this node), `node2@node3`
(every slot of two hostfile nodes), `node1:0,1@node2`. Both jobs name their slots: on one node to the
per-node launcher as its world info, over a hostfile to the runner as `--include` (which it refuses beside
`--num_gpus`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stablekd.ds_configs import resolve as ds_resolve
from stablekd.launcher import rundir
from stablekd.launcher.config import ConfigError, ExperimentConfig

Slots = dict[str, list[int]]  # host -> local slots (GPU indices on a GPU node), in hostfile order


def pool(cfg: ExperimentConfig) -> Slots:
    """Every slot of the run: launch.nproc_per_node on this node, or on each hostfile node (at most its slots)."""
    listed = hosts(cfg) or [("localhost", cfg.launch.nproc_per_node)]
    return {h: list(range(min(n, cfg.launch.nproc_per_node))) for h, n in listed}


def parse(text: str, within: Slots, key: str = "distill.include") -> Slots:
    """`host[:slot,slot]@host...` -> the slots it names, each checked against `within` (ConfigError names `key`)."""
    out: Slots = {}
    for part in text.split("@"):
        host, _, listed = part.strip().partition(":")
        if host not in within:
            raise ConfigError(
                f"{key}: host {host!r} is not in the run's pool ({', '.join(within)}; without a "
                "launch.hostfile this node is `localhost`)"
            )
        if host in out:
            raise ConfigError(f"{key}: host {host!r} named twice in {text!r}")
        try:
            chosen = [int(s) for s in listed.split(",")] if listed else within[host]
        except ValueError:
            raise ConfigError(
                f"{key}: {part!r}: expected `host` or `host:slot,slot` (integers), as deepspeed --include"
            ) from None
        bad = [s for s in chosen if s not in within[host]]
        if bad:
            raise ConfigError(
                f"{key}: slot(s) {bad} of {host} outside its slots {within[host]} "
                "(launch.nproc_per_node and the hostfile's slots=)"
            )
        out[host] = sorted(set(chosen))
    return {h: out[h] for h in within if h in out}  # DeepSpeed numbers ranks in hostfile order


def concurrent(cfg: ExperimentConfig) -> bool:
    """soft_labels and distill run side by side: distill follows the shards from slots of its own."""
    return cfg.distill.follow and bool(cfg.distill.include)


def slots(cfg: ExperimentConfig, stage: str) -> Slots | None:
    """The slots of `stage`'s job; None = the whole pool."""
    if not cfg.distill.include or stage not in ("distill", "soft_labels"):
        return None
    distill = parse(cfg.distill.include, pool(cfg))
    if stage == "distill":
        return distill
    if not cfg.distill.follow:
        return None
    rest = {h: [s for s in ss if s not in distill.get(h, [])] for h, ss in pool(cfg).items()}
    return {h: ss for h, ss in rest.items() if ss}


def world_size(cfg: ExperimentConfig, stage: str | None = None) -> int:
    """Ranks of `stage`'s job (the whole pool when it is not placed, or for `stage` None)."""
    placed = slots(cfg, stage) if stage else None
    return sum(len(ss) for ss in (placed or pool(cfg)).values())


def include_arg(placed: Slots) -> str:
    """The runner's --include value for `placed`, e.g. `localhost:1` or `node1:0,1@node2:0,1`."""
    return "@".join(f"{h}:{','.join(map(str, ss))}" for h, ss in placed.items())


def check(cfg: ExperimentConfig) -> None:
    """distill.include names slots of the pool, leaves soft_labels some when they run side by side, and
    is not combined with launch.no_ssh (whose nodes each start one launcher for one job)."""
    if not cfg.distill.include:
        return
    if cfg.launch.no_ssh:
        raise ConfigError(
            "distill.include: not with launch.no_ssh (every node would start both jobs' launchers); use the "
            "pdsh/openmpi/slurm launcher, or start `stablekd stage distill ... distill.follow=true` on the "
            "distill nodes yourself"
        )
    if concurrent(cfg) and not slots(cfg, "soft_labels"):
        raise ConfigError(
            f"distill.include: {cfg.distill.include!r} takes every slot of the pool ({include_arg(pool(cfg))}); "
            "with distill.follow the soft_labels job runs beside it and needs at least one"
        )


def hosts(cfg: ExperimentConfig) -> list[tuple[str, int]]:
    """(host, slots) of each hostfile line, in order; [] without a hostfile."""
    if not cfg.launch.hostfile:
        return []
    out = []
    for line in Path(cfg.launch.hostfile).read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            slots = next((int(f.split("=")[1]) for f in fields[1:] if f.startswith("slots=")), 1)
            out.append((fields[0], slots))
    return out


def host_names(cfg: ExperimentConfig) -> list[str]:
    """Node i's address (hostfile order); this machine alone without a hostfile."""
    return [h for h, _ in hosts(cfg)] or ["localhost"]


def threads_per_rank(cfg: ExperimentConfig) -> int:
    """Cores ÷ local ranks unless set: two ranks each taking every core run at half speed."""
    return cfg.launch.threads_per_rank or max(1, (os.cpu_count() or 1) // cfg.launch.nproc_per_node)


def resolve_ds_config(cfg: ExperimentConfig, stage: str) -> dict:
    """The stage's DeepSpeed JSON with "auto" filled, validated with DeepSpeed's config class (not written).

    Not validated again when it equals the run's ds/<stage>.json (written only after validation: a resume,
    a later launch): DeepSpeed's config class imports DeepSpeed and torch, ~2 s of every launch."""
    train_cfg = getattr(cfg, stage)
    raw, path = ds_resolve.load(train_cfg.ds_config)
    ds = ds_resolve.resolve(
        raw, train_cfg, world_size(cfg, stage), rundir.tb_dir(cfg, stage) / "deepspeed", str(path)
    )
    written = rundir.ds_path(cfg, stage)
    if not (written.is_file() and json.loads(written.read_text()) == ds):
        ds_resolve.validate(ds, world_size(cfg, stage), str(path))
    return ds
