"""The sections every run shares: run, launch, data (with the built-in bios corpus), tokenizer, and
`TrainConfig`, what every DeepSpeed training stage's section has."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stablekd.data_pipeline.answers import ANSWER_STOP
from stablekd.data_pipeline.errors import ConfigError
from stablekd.data_pipeline.sources import TEXT_UNITS
from stablekd.launcher.config.fields import _at_least, _f, _positive, _sub


@dataclass
class RunConfig:
    name: str = _f("quickstart", "run name; the run directory defaults to runs/<name>")
    out_dir: str = _f(
        "", "run directory (every stage's artifacts, checkpoints and TensorBoard logs); empty = runs/<name>"
    )
    seed: int = _f(0, "seed for model init, data order and sampling")
    trace_samples: bool = _f(
        False,
        "append a hash of every training micro-batch to logs/samples/<stage>.r<rank>.tsv (benchmarks/faults.py "
        "checks with it that kills lose or repeat no sample)",
    )


@dataclass
class LaunchConfig:
    nproc_per_node: int = _f(2, "ranks per node (CPU: processes sharing the cores; GPU: one per GPU)")
    hostfile: str = _f(
        "", "DeepSpeed hostfile (`host slots=N` lines) for a multi-node run; empty = this node only"
    )
    launcher: str = _f("pdsh", "multi-node launcher of the deepspeed runner: pdsh, openmpi, mvapich, slurm")
    no_ssh: bool = _f(
        False, "start each node yourself (`stablekd run`/`stage` on every node with launch.node_rank)"
    )
    node_rank: int = _f(-1, "this node's rank with launch.no_ssh")
    master_addr: str = _f(
        "",
        "address of the first node (multi-node); empty = the hostfile's first host with no_ssh, else the "
        "runner asks that host (ssh hostname -I)",
    )
    master_port: int = _f(0, "rendezvous port; 0 = a free port on one node, 29500 with a hostfile")
    threads_per_rank: int = _f(
        0, "torch threads per rank; 0 = CPU cores / ranks per node (oversubscription halves speed)"
    )
    timeout_s: float = _f(
        1800.0,
        "seconds any collective or wait may take before the job fails naming who is missing: "
        "torch.distributed ops, the no_ssh node handshake (on master_port + 1)",
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "nproc_per_node")
        _positive(self, "timeout_s")
        _at_least(self, 0, "master_port", "threads_per_rank")
        if self.master_port > 65535:
            raise ConfigError(f"master_port: expected a TCP port in [0, 65535], got {self.master_port}")


@dataclass
class BiosConfig:
    people: int = _f(200, "people whose biographies are trained on")
    bios_per_person: int = _f(
        4, "training biographies per person (templates and sentence order drawn anew each)"
    )
    heldout_bios_per_person: int = _f(
        1, "held-out biographies per trained person, written with unseen template combinations"
    )
    unseen_people: int = _f(
        50, "people never seen in training (probe: how consistently a model makes things up)"
    )
    seed: int = _f(0, "corpus seed")

    def __post_init__(self) -> None:
        _at_least(self, 1, "people", "bios_per_person")
        _at_least(self, 0, "heldout_bios_per_person", "unseen_people")


@dataclass
class DataConfig:
    paths: list[str] = _f(
        [],
        ".txt/.jsonl(`text`)/.gz files, directories or globs (documents: data.text_unit, held-out share: "
        "data.eval_fraction); empty = the built-in bios corpus",
    )
    text_unit: str = _f(
        "paragraph",
        "what one document of a .txt file is: paragraph (a block between blank lines, its lines joined "
        "with a single space: hard wraps are layout), line (each non-blank line), file (the whole file, "
        "newlines kept); a .jsonl record is one document whatever this says; the built-in bios corpus is "
        "always one biography per line",
    )
    eval_paths: list[str] = _f(
        [],
        "held-out text for eval loss, perplexity and the report's prefixes; empty = a share of data.paths "
        "(data.eval_fraction), or the bios held-out biographies. Set in a config file, it goes with that "
        "file's data.paths: overriding data.paths on the command line without it is refused",
    )
    eval_fraction: float = _f(
        0.02,
        "with data.paths and no data.eval_paths: share of the documents held out of every training stage "
        "(teacher, tokenizer, soft labels, distill, contrastive) for eval loss, perplexity and report "
        "prefixes, chosen by a hash of each document's text (stable when files are added or reordered; "
        "identical documents land together); 0 = train on everything and skip eval loss; a value other "
        "than the default together with data.eval_paths is refused (the files replace the share)",
    )
    answer_stop: str = _f(
        ANSWER_STOP,
        "regular expression that ends the answer in a response (default: the first line or sentence): "
        "what the task probe compares and the contrastive stage labels candidate groups by",
    )
    bios: BiosConfig = _sub(BiosConfig, "the built-in synthetic biographies corpus")
    seq_len: int = _f(128, "tokens per packed training sequence")
    num_workers: int = _f(0, "dataloader workers per rank (tokenization runs in them)")

    def __post_init__(self) -> None:
        _at_least(self, 2, "seq_len")  # a next-token label needs a second position
        _at_least(self, 0, "num_workers")
        if self.text_unit not in TEXT_UNITS:
            raise ConfigError(f"text_unit: expected one of {', '.join(TEXT_UNITS)}, got {self.text_unit!r}")
        try:
            re.compile(self.answer_stop)
        except re.error as e:
            raise ConfigError(f"answer_stop: not a regular expression: {self.answer_stop!r} ({e})") from None
        # "Given" is told by value: ranks reload config.yaml, which writes every key, so whether the user
        # wrote the key cannot be; the default written out is what an unset key means anyway.
        default = type(self).__dataclass_fields__["eval_fraction"].default
        if self.eval_paths and self.eval_fraction != default:
            raise ConfigError(
                f"eval_fraction: {self.eval_fraction} given with data.eval_paths, which replaces the held-out "
                "share (all of data.paths then trains): give data.eval_paths or data.eval_fraction, not both"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(
                f"eval_fraction: expected a value in [0, 1) (0 = no held-out share), got {self.eval_fraction}"
            )


@dataclass
class TokenizerConfig:
    path: str = _f(
        "",
        "an existing tokenizer directory (AutoTokenizer); empty = the teacher's: a teacher.model directory's "
        "own tokenizer, a teacher.init_from run's, else SentencePiece trained on the corpus",
    )
    vocab_size: int = _f(2000, "SentencePiece vocabulary size when training one")
    train_sentences: int = _f(200_000, "at most this many documents feed tokenizer training")

    def __post_init__(self) -> None:
        _at_least(self, 1, "vocab_size", "train_sentences")


@dataclass
class TrainConfig:
    """What every DeepSpeed training stage shares; `"auto"` values of its DeepSpeed JSON are filled from these."""

    ds_config: str = _f("zero3.json", "DeepSpeed JSON: a file in ds_configs/ or a path")
    max_steps: int = _f(300, "optimizer steps")
    micro_batch_size: int = _f(8, "sequences per rank per forward")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr_ratio: float = _f(0.1, "final learning rate / peak (cosine decay)")
    warmup_steps: int = _f(30, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    grad_clip: float = _f(
        1.0, "gradient norm clipping (set explicitly: DeepSpeed's default changed in 0.19.3)"
    )
    dtype: str = _f(
        "auto",
        "bf16, fp32, or auto: bf16 where matmuls are fast in it (GPU; CPU with AMX/AVX512-BF16), else fp32",
    )
    eval_every: int = _f(100, "eval loss every N steps (and at the end); 0 = only at the end")
    eval_batches: int = _f(4, "micro-batches per rank in one eval")
    save_every: int = _f(100, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(
        2, "complete checkpoints kept; older tags are deleted once a newer one is complete"
    )
    log_every: int = _f(10, "TensorBoard scalars every N steps")

    def __post_init__(self) -> None:
        for key in (
            "max_steps",
            "micro_batch_size",
            "grad_accum",
            "eval_batches",
            "save_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected a positive integer, got {getattr(self, key)}")
        _at_least(self, 0, "warmup_steps", "eval_every")
        _positive(self, "lr")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"weight_decay and grad_clip: expected values >= 0, got {self.weight_decay}, {self.grad_clip}"
            )
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype: expected 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
