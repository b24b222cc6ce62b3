"""The stage registry (docs/architecture.md, The stage registry): every fact about a stage, written once.

The pipeline driver (order, skip/resume, where DONE.json lives), the training loop (checkpoint and
TensorBoard directories), the evaluate stage (which models the report has, in which column order), the
CLI (`stablekd stage NAME` choices), the file checks and the upstream check (what a stage reads has
finished: `done.check_upstream`) read this table. Adding a stage is one row here
and one module `launcher/stages/<name>.py` with `run(cfg)` (for an in-process stage, also
`needs_ranks(cfg)`); its checks before ranks start, if any, are a function of its name in
launcher/driver/preflight.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str  # `stablekd stage NAME`, the module launcher/stages/<name>.py, tb/<name>/, ds/<name>.json
    out_dir: str  # <run>/<out_dir>/: DONE.json, ckpt/, and hf/ for a stage that exports a model
    on_ranks: bool  # started by the deepspeed runner; False = runs in the launching process
    trains: bool  # a DeepSpeed training stage: the config section of its name is a TrainConfig
    model: str = ""  # report column of the Hugging Face model it exports to <out_dir>/hf ("" = none)
    sections: tuple[str, ...] = ()  # config sections its result depends on besides its own (in the hash)
    # Earlier stages whose output it reads: each must have finished with its current config (DONE.json
    # with the hash it would have now) before this one starts (done.check_upstream).
    needs: tuple[str, ...] = ()
    # Earlier stages whose output it reads when they exist (evaluate: every model the run has): checked
    # like `needs` once the stage's directory exists, ignored while it does not.
    uses: tuple[str, ...] = ()
    # Config keys besides the shared ones (launcher/driver/data_order.py) that fix the order of what it reads:
    # a resume with another value is refused.
    order: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"stablekd.launcher.stages.{self.name}"

    # Where its files lie, relative to the run directory (launcher/rundir.py joins them).
    @property
    def ds_json(self) -> str:  # its resolved DeepSpeed JSON (a training stage's)
        return f"ds/{self.name}.json"

    @property
    def tb_dir(self) -> str:  # its TensorBoard scalars
        return f"tb/{self.name}"

    @property
    def ckpt_dir(self) -> str:  # its checkpoints (complete.json names the last complete tag)
        return f"{self.out_dir}/ckpt"


# In pipeline order: a stage reads only what the stages before it left.
REGISTRY: tuple[StageSpec, ...] = (
    StageSpec("teacher", "teacher", on_ranks=True, trains=True, model="teacher"),
    StageSpec(
        "soft_labels",
        "soft_labels",
        on_ranks=True,
        trains=False,
        needs=("teacher",),
        # which contexts a rank samples and the seed of each generate call
        order=(
            "soft_labels.candidate_contexts",
            "soft_labels.generate_batch_size",
            "soft_labels.candidate_tasks_only",  # which records the contexts are drawn from
        ),
    ),
    # distill.online reads the teacher instead; distill.follow reads soft labels still being written
    StageSpec(
        "distill",
        "student",
        on_ranks=True,
        trains=True,
        model="student",
        sections=("student",),
        needs=("soft_labels",),
        # which micro-batches are the student's own samples, and what they continue
        order=(
            "distill.on_policy_warmup_steps",
            "distill.on_policy_prompts",
            "distill.on_policy_task_prompts",
        ),
    ),
    StageSpec(
        "contrastive",
        "contrastive",
        on_ranks=True,
        trains=True,
        model="contrastive",
        needs=("soft_labels", "distill"),
    ),
    StageSpec("evaluate", "eval", on_ranks=False, trains=False, uses=("teacher", "distill", "contrastive")),
)
NAMES: list[str] = [s.name for s in REGISTRY]
MODELS: list[str] = [s.model for s in REGISTRY if s.model]  # the report's columns, in this order


def spec(name: str) -> StageSpec:
    """The registry row of `name`; a KeyError lists the stages."""
    for s in REGISTRY:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r} (stages: {', '.join(NAMES)})")


def model_stage(model: str) -> StageSpec:
    """The stage whose export is the report column `model` (teacher, student, contrastive)."""
    for s in REGISTRY:
        if s.model == model:
            return s
    raise KeyError(f"unknown model {model!r} (models: {', '.join(MODELS)})")
