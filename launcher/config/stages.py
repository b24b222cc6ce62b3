"""One section per stage (the registry's names, launcher/stages/__init__.py): teacher, soft_labels, student,
distill, contrastive, evaluate."""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass

from stablekd.data_pipeline import encodings
from stablekd.data_pipeline.errors import ConfigError
from stablekd.launcher.config.fields import _at_least, _f, _model, _positive, _probability
from stablekd.launcher.config.sections import TrainConfig


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


# soft_labels.encoding and every encoding's parameters, read from the registry (data_pipeline/encodings.py):
# an encoding added there brings its keys, defaults, help and checks without an edit here.
_EncodingKeys = make_dataclass(
    "_EncodingKeys",
    [("encoding", str, _f(encodings.DEFAULT, encodings.describe()))]
    + [(p.name, type(p.default), _f(p.default, p.help)) for p in encodings.parameters()],
)


@dataclass
class SoftLabelsConfig(_EncodingKeys):
    """The sharded ZeRO-3 teacher labels the training stream and samples candidate groups."""

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
    candidate_tasks_only: bool = _f(
        False,
        "data.paths: contexts from task records' prompts only (groups labelled by their reference "
        "responses), plain documents skipped",
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
        encodings.check(self.encoding, encodings.settings(self))
        _at_least(self, 1, "micro_batch_size", "records_per_shard", "candidate_contexts")
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
        "content when it brings one; any number of padded embedding rows), or with its own tokenizer through "
        "distill.cross_tokenizer=uld|hybrid",
    )

    def __post_init__(self) -> None:
        _model("model", self.model)


CROSS_TOKENIZER = ("off", "uld", "hybrid")


@dataclass
class DistillConfig(TrainConfig):
    """The student learns from the teacher's soft labels: alpha·KD + (1 − alpha)·CE (objectives/kd.py)."""

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
    cross_tokenizer: str = _f(
        "off",
        "a student with another tokenizer (student.model, a directory with its own): off (refused), uld "
        "(sorted-probability L1 at positions aligned by text) or hybrid (distill.kind on pieces both "
        "vocabularies share, uld on the rest); objectives/cross_tokenizer.py",
    )
    online: bool = _f(
        False,
        "compute soft labels in this job from the sharded ZeRO-3 teacher instead of reading soft_labels/",
    )
    on_policy: float = _f(
        0.0,
        "share λ of micro-batches the student samples itself (continuing the first "
        "distill.on_policy_prompt_tokens tokens of a drawn record) and the sharded teacher in this job "
        "scores: distill.kind on every generated token (GKD); 0 = soft labels only",
    )
    on_policy_warmup_steps: int = _f(
        0,
        "on-policy: λ rises linearly from 0 to distill.on_policy over this many steps (a student distilled "
        "from scratch samples noise at first); 0 = λ from the first step",
    )
    on_policy_prompts: str = _f(
        "records",
        "on-policy prompts: records (the first distill.on_policy_prompt_tokens tokens of the drawn record) or "
        "tasks (the prompts of the first distill.on_policy_task_prompts task records of data.paths, each "
        "after an EOS and cut to its last on_policy_prompt_tokens − 1 tokens; B of one length per batch)",
    )
    on_policy_task_prompts: int = _f(1024, "on-policy with prompts=tasks: how many task records to draw from")
    on_policy_prompt_tokens: int = _f(32, "on-policy: tokens of each drawn record the student continues")
    on_policy_new_tokens: int = _f(32, "on-policy: tokens the student samples per record")
    on_policy_temperature: float = _f(1.0, "on-policy: the student's sampling temperature")
    on_policy_kind: str = _f(
        "",
        "on-policy: the divergence on the teacher's full logits (fkl, rkl, gjsd with distill.beta, tvd, skl, "
        "mse); empty = distill.kind. Sampled soft labels fix distill.kind to fkl, not this",
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
        if self.cross_tokenizer not in CROSS_TOKENIZER:
            raise ConfigError(
                f"cross_tokenizer: expected one of {', '.join(CROSS_TOKENIZER)}, got {self.cross_tokenizer!r}"
            )
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"on_policy: expected a share in [0, 1], got {self.on_policy}")
        if (
            self.on_policy_prompt_tokens < 1
            or self.on_policy_new_tokens < 1
            or self.on_policy_temperature <= 0
        ):
            raise ConfigError(
                "on_policy_prompt_tokens, on_policy_new_tokens: expected >= 1, on_policy_temperature > 0, got "
                f"{self.on_policy_prompt_tokens}, {self.on_policy_new_tokens}, {self.on_policy_temperature}"
            )
        if self.on_policy_prompts not in ("records", "tasks") or self.on_policy_task_prompts < 1:
            raise ConfigError(
                f"on_policy_prompts, on_policy_task_prompts: expected records or tasks, and >= 1, got "
                f"{self.on_policy_prompts!r}, {self.on_policy_task_prompts}"
            )
        if self.on_policy_warmup_steps < 0 or (self.on_policy_warmup_steps and not self.on_policy):
            raise ConfigError(
                f"on_policy_warmup_steps: expected >= 0, and 0 without distill.on_policy, got "
                f"{self.on_policy_warmup_steps} (on_policy {self.on_policy})"
            )
        if self.on_policy_kind and self.on_policy_kind not in (*kinds, "mse"):
            raise ConfigError(
                f"on_policy_kind: expected one of {', '.join(kinds)}, mse or empty (= kind), got {self.on_policy_kind!r}"
            )
        if self.on_policy and self.cross_tokenizer != "off":
            raise ConfigError(
                "on_policy with cross_tokenizer: the teacher scores the student's own tokens, so both need one "
                "tokenizer (set on_policy=0 or cross_tokenizer=off)"
            )
        if self.follow and self.online:
            raise ConfigError(
                "follow and online: choose one source (follow reads shards, online computes them)"
            )
        if self.follow_timeout_s <= 0:
            raise ConfigError(f"follow_timeout_s: expected > 0, got {self.follow_timeout_s}")


LABEL_RULES = ("auto", "truth", "reference", "majority", "none")


@dataclass
class ContrastiveConfig(TrainConfig):
    """The distilled student fine-tuned on candidate groups: InfoNCE + lam · (KD or CE) (objectives/contrastive.py)."""

    ds_config: str = _f("zero2.json", "DeepSpeed JSON of the student: a file in ds_configs/ or a path")
    init_from: str = _f(
        "",
        "a Hugging Face directory of the student to start from instead of the distill stage's export "
        "(student/hf), e.g. one distilled by a benchmark; the distill stage is then not needed",
    )
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
    lm: str = _f(
        "kd",
        "the lam term: kd (the soft-label stream, distill.kind at distill.temperature; for a student with its "
        "own tokenizer realigned and through distill.cross_tokenizer's loss, as in distill) or ce (in the "
        "student's tokens)",
    )
    negatives: int = _f(
        8,
        "likelihood scorer: other contexts' continuations scored per context; 0 = a context's own rows "
        "only (positives against its hard negatives)",
    )
    similar_negatives: bool = _f(
        True,
        "likelihood scorer: draw negatives from contexts asking about the same attribute first (bios), "
        "the other people's answers a model confuses with the truth; false = uniformly from the batch",
    )
    hard_negatives: int = _f(
        0,
        "likelihood scorer: of each context's negatives (its own wrong continuations and other contexts'), "
        "only the N it scores highest enter its InfoNCE denominator (model-scored mining); 0 = all",
    )
    own_samples: int = _f(
        0,
        "the model being trained samples N continuations of each context per micro-batch (at the candidates' "
        "temperature and top_p), labelled like the teacher's (they do not vote): its own wrong answers "
        "become hard negatives, its right ones positives; 0 = the teacher's samples only",
    )
    score_tokens: int = _f(
        0,
        "likelihood scorer: score the first N tokens of each continuation (where a question's answer is); "
        "0 = every token",
    )
    labels: str = _f(
        "auto",
        "what makes a continuation a positive or a hard negative of its context (data_pipeline/answers.py): "
        "auto = the ground truth on the built-in bios corpus, else a task prompt's reference response, else "
        "the teacher's majority answer among its samples; truth (bios), reference (groups without one "
        "unlabelled), majority (references unused); none = every continuation of a context is a positive",
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
        if self.labels not in LABEL_RULES:
            raise ConfigError(f"labels: expected one of {', '.join(LABEL_RULES)}, got {self.labels!r}")
        if self.hard_negatives < 0 or (self.hard_negatives and self.scorer != "likelihood"):
            raise ConfigError(
                f"hard_negatives: expected >= 0, and 0 with the {self.scorer} scorer, got {self.hard_negatives}"
            )
        if self.tau <= 0 or self.lam < 0 or self.margin < 0:
            raise ConfigError(
                f"tau > 0, lam >= 0, margin >= 0 expected, got {self.tau}, {self.lam}, {self.margin}"
            )
        if self.score_tokens < 0:
            raise ConfigError(f"score_tokens: expected >= 0, got {self.score_tokens}")
        _at_least(self, 0, "own_samples")
        if self.negatives < 0 or self.head_dim < 1:
            raise ConfigError(
                f"negatives >= 0 and head_dim >= 1 expected, got {self.negatives}, {self.head_dim}"
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
    task_templates: list[str] = _f(
        [],
        "paraphrase check: each held-out task prompt asked again in each template ('{prompt}' = the prompt "
        "as written), greedily; task_paraphrase_contradiction = prompts whose answers differ across them",
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
        for t in self.task_templates:
            try:
                ok = "{prompt}" in t and t.format(prompt="") is not None
            except (KeyError, IndexError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(
                    f"task_templates: {t!r}: expected a template with '{{prompt}}' and no other field "
                    "(write a literal brace as '{{' or '}}')"
                )
