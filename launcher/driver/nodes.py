"""The nodes of a run: hostfile hosts, and the no_ssh handshake in which node 0 prepares for the others.

With launch.no_ssh every node runs the same command. Node 0 writes the run directory (config.yaml,
corpus, tokenizer, DeepSpeed JSONs: each file atomically) and the others must read it only once it is
complete and only if it is this launch's. A file in the run directory cannot say that (one left by the
last launch looks the same), so the nodes meet on a TCP store that node 0 serves at launch.master_addr,
port launch.master_port + 1, for the length of the handshake only: node 0 publishes the config hash it
prepared, each node answers with its own, and node 0 closes the store once every node has answered. A
node that never comes, or that runs another config, fails the handshake on every node within
launch.timeout_s, naming that node. (master_port itself stays free for the ranks' own rendezvous.)
"""

from __future__ import annotations

from datetime import timedelta

from stablekd.launcher import placement
from stablekd.launcher.config import ConfigError, ExperimentConfig

# The rendezvous port of a multi-node job without launch.master_port: every node must pick the same one
# without talking to the others (DeepSpeed's own default). The handshake store listens one above it.
DEFAULT_MASTER_PORT = 29500


def _store(cfg: ExperimentConfig, is_master: bool):
    from torch.distributed import TCPStore  # torch only where nodes meet: planning a run does not need it

    launch = cfg.launch
    addr = launch.master_addr or placement.host_names(cfg)[0]
    port = (launch.master_port or DEFAULT_MASTER_PORT) + 1
    try:
        return TCPStore(
            addr,
            port,
            is_master=is_master,
            timeout=timedelta(seconds=launch.timeout_s),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as e:  # DistStoreError is a RuntimeError
        role = "serve" if is_master else "reach node 0's"
        raise ConfigError(
            f"node {launch.node_rank}: could not {role} handshake store at {addr}:{port} within "
            f"launch.timeout_s={launch.timeout_s:g}s ({' '.join(str(e).split())[:200]}): is node 0 running "
            "the same command, and launch.master_addr its address?"
        ) from None


def lead(cfg: ExperimentConfig, prepared_hash: str) -> None:
    """Node 0, after preparing: publish `prepared_hash`, wait until every other node has answered."""
    names = placement.host_names(cfg)
    store = _store(cfg, is_master=True)
    store.set("prepared", prepared_hash)
    keys = [f"node{i}" for i in range(1, len(names))]
    try:
        store.wait(keys, timedelta(seconds=cfg.launch.timeout_s))
    except RuntimeError:
        missing = [f"node {i} ({names[i]})" for i in range(1, len(names)) if not store.check([f"node{i}"])]
        raise ConfigError(
            f"node 0: {', '.join(missing)} did not join within launch.timeout_s={cfg.launch.timeout_s:g}s: "
            "start the same command there with its launch.node_rank"
        ) from None
    wrong = [(i, h) for i in range(1, len(names)) if (h := store.get(f"node{i}").decode()) != prepared_hash]
    if wrong:
        raise ConfigError(
            "node 0: "
            + "; ".join(f"node {i} ({names[i]}) runs config {h}" for i, h in wrong)
            + f", node 0 prepared {prepared_hash}: every node needs the same config and overrides"
        )


def follow(cfg: ExperimentConfig, my_hash: str) -> None:
    """Another node: wait for node 0's preparation of this launch, answer with this node's config hash."""
    store = _store(cfg, is_master=False)
    try:
        prepared = store.get("prepared").decode()  # blocks until node 0 has prepared, up to timeout_s
    except RuntimeError:
        raise ConfigError(
            f"node {cfg.launch.node_rank}: node 0 did not finish preparing {cfg.run_dir} within "
            f"launch.timeout_s={cfg.launch.timeout_s:g}s"
        ) from None
    store.set(f"node{cfg.launch.node_rank}", my_hash)
    if prepared != my_hash:
        raise ConfigError(
            f"{cfg.run_dir}: node 0 prepared another config (hash {prepared}, node "
            f"{cfg.launch.node_rank} {my_hash}): every node needs the same config and overrides"
        )
