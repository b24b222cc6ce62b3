"""The experiment schema: typed dataclasses, one YAML of values, dotted `key=value` overrides.

Each field's `help` is its documentation (`stablekd keys` prints them). Unknown keys, wrong types and
missing files are `ConfigError`s naming the key and the file; the CLI turns them into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stablekd.data_pipeline.files import atomic_write
from stablekd.data_pipeline.sources import TEXT_UNITS
from stablekd.model.presets import PRESETS

# soft_labels.encoding values (data_pipeline/encodings.py implements them; it needs torch, which the
# launching process does not import to plan a run).
ENCODINGS = ("topk", "topp", "sampled")


class ConfigError(ValueError):
    """A bad experiment config: the message names the key or file and what was expected."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def _at_least(section: Any, low: int, *keys: str) -> None:
    """Each of `keys` (int fields of `section`) is >= low; the error names the key, the bound and the value."""
    for key in keys:
        if getattr(section, key) < low:
            raise ConfigError(f"{key}: expected an integer >= {low}, got {getattr(section, key)}")


def _probability(section: Any, *keys: str) -> None:
    """Each of `keys` is a probability mass threshold in (0, 1] (top_p: 1 = no nucleus cut)."""
    for key in keys:
        if not 0.0 < getattr(section, key) <= 1.0:
            raise ConfigError(f"{key}: expected a value in (0, 1], got {getattr(section, key)}")


def _positive(section: Any, *keys: str) -> None:
    """Each of `keys` (temperatures, rates) is > 0."""
    for key in keys:
        if not getattr(section, key) > 0:
            raise ConfigError(f"{key}: expected a value > 0, got {getattr(section, key)}")


def _model(key: str, name: str) -> None:
    """A model name is a preset (model/presets.py) or a local Hugging Face model directory."""
    if name not in PRESETS and not Path(name).is_dir():
        raise ConfigError(
            f"{key}: {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing model directory"
        )


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
        False, "start each node yourself (`stablekd launch` on every node with launch.node_rank)"
    )
    node_rank: int = _f(-1, "this node's rank with launch.no_ssh")
    master_addr: str = _f("", "address of the first node (multi-node); empty = runner default")
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
        "(data.eval_fraction), or the bios held-out biographies",
    )
    eval_fraction: float = _f(
        0.02,
        "with data.paths and no data.eval_paths: share of the documents held out of every training stage "
        "(teacher, tokenizer, soft labels, distill, contrastive) for eval loss, perplexity and report "
        "prefixes, chosen by a hash of each document's text (stable when files are added or reordered; "
        "identical documents land together); 0 = train on everything and skip eval loss",
    )
    bios: BiosConfig = _sub(BiosConfig, "the built-in synthetic biographies corpus (DESIGN §6)")
    seq_len: int = _f(128, "tokens per packed training sequence")
    num_workers: int = _f(0, "dataloader workers per rank (tokenization runs in them)")

    def __post_init__(self) -> None:
        _at_least(self, 2, "seq_len")  # a next-token label needs a second position
        _at_least(self, 0, "num_workers")
        if self.text_unit not in TEXT_UNITS:
            raise ConfigError(f"text_unit: expected one of {', '.join(TEXT_UNITS)}, got {self.text_unit!r}")
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


@dataclass
class TeacherConfig(TrainConfig):
    model: str = _f(
        "teacher-s",
        "model preset name (model/presets.py) or a local Hugging Face directory of any causal-LM "
        "architecture (its weights; its tokenizer.json/tokenizer.model, when it has one, is the run's tokenizer)",
    )
    init_from: str = _f(
        "",
        "continue a previous stablekd run directory (its ZeRO checkpoint, tokenizer and model source); "
        "a Hugging Face directory goes in teacher.model",
    )
    export_hf: bool = _f(
        True,
        "also save the final teacher in Hugging Face format (teacher/hf); gathers the full model on each rank",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _model("model", self.model)


@dataclass
class SoftLabelsConfig:
    """The sharded ZeRO-3 teacher labels the training stream and samples candidate groups."""

    encoding: str = _f(
        "sampled",
        "what a record stores per token (data_pipeline/encodings.py): topk (k ids + log-probs), topp "
        "(ids until their mass reaches soft_labels.mass, at most k, within mean_entries per token on "
        "average), sampled (soft_labels.draws ids drawn from the teacher, with counts: unbiased, fkl only)",
    )
    k: int = _f(32, "topk: ids and log-probs stored per token; topp: the most entries a token keeps")
    mass: float = _f(0.9, "topp: a token's entries stop once they hold this much teacher probability")
    mean_entries: int = _f(
        8, "topp: room per token, on average over a sequence (the least probable entries go first)"
    )
    draws: int = _f(
        8,
        "sampled: ids drawn per token (stored unique, with counts): 8 is 27 bytes/token; the default "
        "encoding, chosen from benchmarks/soft_label_encodings.py (README: top-k is biased on real text)",
    )
    proposal_temperature: float = _f(
        0.0, "sampled: draw from softmax(logits / this) and store importance weights; 0 = the teacher at T"
    )
    logprob_bits: int = _f(8, "8 (one byte: round(255·sqrt(p)), encodings.py) or 16 (float16) per log-prob")
    temperature: float = _f(1.0, "teacher temperature T of the stored log-probs")
    max_sequences: int = _f(
        0,
        "training sequences to label; 0 = one pass over the corpus; more than a pass repeats the corpus, "
        "each pass cut into blocks at other offsets (a student replaying one pass overfits it)",
    )
    micro_batch_size: int = _f(8, "sequences per rank per teacher forward")
    records_per_shard: int = _f(256, "sequences per soft-label shard file")
    fidelity_positions: int = _f(
        4096, "token positions per rank sampled for the kept-mass / KL fidelity record"
    )
    candidates: bool = _f(
        True, "also sample candidate groups (continuations per context) for the contrastive stage"
    )
    candidate_contexts: int = _f(
        256, "contexts to sample candidates for (bios: questions and biography starts)"
    )
    candidates_per_context: int = _f(4, "M sampled continuations per context")
    generate_batch_size: int = _f(
        64,
        "rows (contexts × M) per rank per generate call; ZeRO-3 gathers every layer once per new token, "
        "so large calls amortise the gathers",
    )
    include_gold: bool = _f(True, "add the corpus continuation as one more member of each group")
    max_new_tokens: int = _f(32, "tokens sampled per continuation")
    sample_temperature: float = _f(1.0, "sampling temperature for candidates")
    top_p: float = _f(0.95, "nucleus sampling threshold for candidates")

    def __post_init__(self) -> None:
        _at_least(self, 1, "k", "micro_batch_size", "records_per_shard", "candidate_contexts")
        _at_least(self, 1, "mean_entries", "draws")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"encoding: expected one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.logprob_bits not in (8, 16):
            raise ConfigError(f"logprob_bits: expected 8 or 16, got {self.logprob_bits}")
        for key in ("k", "draws"):  # counts are stored in one byte
            if self.encoding != "topk" and getattr(self, key) > 255:
                raise ConfigError(
                    f"{key}: at most 255 with encoding {self.encoding}, got {getattr(self, key)}"
                )
        if not 0.0 < self.mass <= 1.0:
            raise ConfigError(f"mass: expected a value in (0, 1], got {self.mass}")
        if self.proposal_temperature < 0:
            raise ConfigError(
                f"proposal_temperature: expected >= 0 (0 = the teacher), got {self.proposal_temperature}"
            )
        _at_least(self, 1, "candidates_per_context", "generate_batch_size", "max_new_tokens")
        _at_least(self, 0, "max_sequences", "fidelity_positions")
        _positive(self, "temperature", "sample_temperature")
        _probability(self, "top_p")


@dataclass
class StudentConfig:
    model: str = _f(
        "student-s",
        "student preset (model/presets.py; student-s is ~1/4 of teacher-s, tiny-student ~1/4 of tiny) or a "
        "local Hugging Face directory of any causal-LM architecture with the run's tokenizer (the same by "
        "content when it brings one; any number of padded embedding rows)",
    )

    def __post_init__(self) -> None:
        _model("model", self.model)


@dataclass
class DistillConfig(TrainConfig):
    """The student learns from the teacher's soft labels: alpha·KD + (1 − alpha)·CE (objectives/distill.py)."""

    ds_config: str = _f("zero2.json", "DeepSpeed JSON of the student: a file in ds_configs/ or a path")
    max_steps: int = _f(600, "optimizer steps")
    lr: float = _f(3e-3, "peak learning rate")
    kind: str = _f(
        "fkl", "divergence on the top-k + tail bins: fkl, rkl, gjsd (distill.beta), tvd, skl (distill.skew)"
    )
    temperature: float = _f(
        1.0, "T of the KD term (× T²); must equal soft_labels.temperature, the T the log-probs are stored at"
    )
    alpha: float = _f(1.0, "weight of KD; 1 − alpha goes to next-token cross-entropy on the same tokens")
    beta: float = _f(0.5, "gjsd mixture weight: 0 = forward KL, 1 = reverse KL")
    skew: float = _f(0.1, "skl: KL(p ‖ skew·p + (1 − skew)·q)")
    online: bool = _f(
        False,
        "compute soft labels in this job from the sharded ZeRO-3 teacher instead of reading soft_labels/",
    )
    follow: bool = _f(False, "read soft_labels/ shards while the soft_labels stage is still writing them")
    follow_timeout_s: float = _f(
        600.0,
        "follow mode: fail when no new shard is committed for this long (naming the shard awaited); "
        "at most launch.timeout_s",
    )
    include: str = _f(
        "",
        "slots of the distill job in deepspeed --include syntax (`localhost:1`, `node2@node3`); empty = "
        "all. With follow, `stablekd run` runs soft_labels on the other slots at the same time",
    )
    export_hf: bool = _f(
        True, "save the final student in Hugging Face format with its tokenizer (student/hf)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        kinds = ("fkl", "rkl", "gjsd", "tvd", "skl")  # mse needs full teacher logits; the stream has top-k
        if self.kind not in kinds:
            raise ConfigError(
                f"kind: expected one of {', '.join(kinds)} (soft labels are top-k: mse needs full logits), "
                f"got {self.kind!r}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"temperature: expected > 0, got {self.temperature}")
        for key in ("alpha", "beta", "skew"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}: expected a value in [0, 1], got {getattr(self, key)}")
        if self.follow and self.online:
            raise ConfigError(
                "follow and online: choose one source (follow reads shards, online computes them)"
            )
        if self.follow_timeout_s <= 0:
            raise ConfigError(f"follow_timeout_s: expected > 0, got {self.follow_timeout_s}")


@dataclass
class ContrastiveConfig(TrainConfig):
    """The distilled student fine-tuned on candidate groups: InfoNCE + lam · (KD or CE) (objectives/contrastive.py)."""

    ds_config: str = _f("zero2.json", "DeepSpeed JSON of the student: a file in ds_configs/ or a path")
    max_steps: int = _f(150, "optimizer steps")
    micro_batch_size: int = _f(4, "candidate groups (contexts) per rank per micro-batch; LM batches the same")
    lr: float = _f(3e-4, "peak learning rate (fine-tuning a trained student)")
    warmup_steps: int = _f(10, "linear warmup steps")
    scorer: str = _f(
        "likelihood",
        "likelihood: s = mean log p(continuation | context), a context's own continuations against other "
        "contexts'; embedding: cosine of mean-pooled last hidden states through a projection head",
    )
    tau: float = _f(
        1.0, "InfoNCE temperature (likelihood scores are nats/token; embedding cosines want ~0.1)"
    )
    lam: float = _f(1.0, "weight of the language-model term (lm) that keeps it a language model")
    lm: str = _f("kd", "the lam term: kd (the soft-label stream, distill.kind at distill.temperature) or ce")
    negatives: int = _f(8, "likelihood scorer: other contexts' continuations scored per context")
    similar_negatives: bool = _f(
        True,
        "likelihood scorer: draw negatives from contexts asking about the same attribute first (bios), "
        "the other people's answers a model confuses with the truth; false = uniformly from the batch",
    )
    score_tokens: int = _f(
        0,
        "likelihood scorer: score the first N tokens of each continuation (where a question's answer is); "
        "0 = every token",
    )
    hard_negatives: bool = _f(
        True,
        "ground truth known (bios): continuations contradicting it are negatives, only those stating it are "
        "positives, unverifiable ones are left out (likelihood) or negatives (embedding); false = every "
        "continuation of a context is a positive",
    )
    margin: float = _f(0.0, "SimCTG token-level term on the LM batches with this margin rho; 0 = off")
    head_dim: int = _f(128, "embedding scorer: projection head output size")
    export_hf: bool = _f(
        True, "save the final model in Hugging Face format with its tokenizer (contrastive/hf)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scorer not in ("likelihood", "embedding"):
            raise ConfigError(f"scorer: expected 'likelihood' or 'embedding', got {self.scorer!r}")
        if self.lm not in ("kd", "ce"):
            raise ConfigError(f"lm: expected 'kd' or 'ce', got {self.lm!r}")
        if self.tau <= 0 or self.lam < 0 or self.margin < 0:
            raise ConfigError(
                f"tau > 0, lam >= 0, margin >= 0 expected, got {self.tau}, {self.lam}, {self.margin}"
            )
        if self.score_tokens < 0:
            raise ConfigError(f"score_tokens: expected >= 0, got {self.score_tokens}")
        if self.negatives < 1 or self.head_dim < 1:
            raise ConfigError(
                f"negatives and head_dim: expected positive integers, got {self.negatives}, {self.head_dim}"
            )


@dataclass
class EvaluateConfig:
    """Stability and efficiency of every model the run has (teacher, student, contrastive student)."""

    samples: int = _f(5, "K sampled answers per bios question (plus one greedy answer)")
    max_prompts: int = _f(
        60, "at most this many (person, attribute) questions per group (trained / unseen people)"
    )
    free_bios: int = _f(20, "free-generated biographies per model (in-text contradiction)")
    prefixes: int = _f(40, "corpus prefixes continued for repetition, diversity and coherence")
    task_prompts: int = _f(
        40, "held-out task records (prompt/response, chat) whose prompts the task probe asks (task_* keys)"
    )
    prefix_tokens: int = _f(16, "tokens of each prefix")
    max_new_tokens: int = _f(
        64, "tokens per prefix continuation and free biography (a quickstart biography is ~57 tokens)"
    )
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(0.95, "nucleus sampling threshold")
    ppl_batches: int = _f(8, "held-out batches of 8 sequences for perplexity")
    batch_size: int = _f(64, "sequences per generate call (prompts x samples); lower it for a large model")
    coherence_encoder: str = _f(
        "", "local sentence-transformers / HF encoder directory; empty = the teacher's mean-pooled states"
    )
    seed: int = _f(1234, "sampling seed, the same for every model")

    def __post_init__(self) -> None:
        _at_least(self, 1, "samples", "max_prompts", "prefix_tokens", "max_new_tokens", "ppl_batches")
        _at_least(self, 1, "batch_size")
        _at_least(self, 0, "free_bios", "prefixes", "task_prompts")
        _positive(self, "temperature")
        _probability(self, "top_p")


@dataclass
class ExperimentConfig:
    run: RunConfig = _sub(RunConfig, "run name, directory and seed")
    launch: LaunchConfig = _sub(LaunchConfig, "how ranks are started")
    data: DataConfig = _sub(DataConfig, "training text")
    tokenizer: TokenizerConfig = _sub(TokenizerConfig, "tokenizer")
    teacher: TeacherConfig = _sub(TeacherConfig, "teacher training stage")
    soft_labels: SoftLabelsConfig = _sub(
        SoftLabelsConfig, "soft-label and candidate generation from the sharded teacher"
    )
    student: StudentConfig = _sub(StudentConfig, "the student model distillation trains")
    distill: DistillConfig = _sub(DistillConfig, "student distillation from the soft labels")
    contrastive: ContrastiveConfig = _sub(
        ContrastiveConfig, "contrastive fine-tuning of the distilled student"
    )
    evaluate: EvaluateConfig = _sub(EvaluateConfig, "stability evaluation and report")

    def __post_init__(self) -> None:
        # With a tokenizer trained here its size is known now (an existing one is checked by the stage).
        trained = not (self.tokenizer.path or self.teacher.init_from or Path(self.teacher.model).is_dir())
        if trained and self.soft_labels.k > self.tokenizer.vocab_size:
            raise ConfigError(
                f"soft_labels.k: expected at most tokenizer.vocab_size ({self.tokenizer.vocab_size}) ids per "
                f"token, got {self.soft_labels.k}"
            )
        if self.soft_labels.encoding == "sampled" and self.distill.kind != "fkl":
            raise ConfigError(
                f"distill.kind: sampled soft labels estimate the forward KL only (kind fkl), got "
                f"{self.distill.kind!r}; use soft_labels.encoding topk or topp for other divergences"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.run.name}")


# --- loading -------------------------------------------------------------------------------------


# A decimal number as users write it in YAML or key=value: 3e-4, 1E5, -2.5e+3, .5, 10.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, a string for a list of strings."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, source)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (float, int) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        # PyYAML (YAML 1.1) reads 3e-4 and 1e5 as strings (it wants a dot: 3.0e-4): take them as users mean
        # them. An int key takes one only when it is a whole number (1e5, not 1.5e0).
        number = float(value)
        if tp is float:
            return number
        if number.is_integer():
            return int(number)
        raise ConfigError(f"{source}: {key}: expected int, got {value!r} (not a whole number)")
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{source}: {key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(
                f"{source}: unknown key '{key}' (known under '{prefix or 'top level'}': {', '.join(names)})"
            )
        kwargs[k] = _coerce(v, hints[k], key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {prefix + '.' if prefix else ''}{e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{p}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment (None = all defaults) and apply `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist (expected a YAML experiment file, e.g. configs/quickstart.yaml)"
            )
        try:
            tree = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); expected a UTF-8 "
                "YAML experiment file"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}".splitlines()[0]) from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"{p}: expected a mapping of sections (run, data, teacher, ...), got {type(tree).__name__}"
            )
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. teacher.max_steps=200")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else "")
        source = f"{source} + overrides" if "overrides" not in source else source
    return _build(ExperimentConfig, tree, "", source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))  # ranks and other nodes read it


def config_hash(*parts: Any) -> str:
    """Stable hash of config sections (dataclasses or plain data); DONE.json and checkpoints record it."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """`key (type, default): help` lines for every field, for `stablekd keys`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], key + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"{key} ({tp}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
