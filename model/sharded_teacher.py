"""The teacher loaded straight from the ZeRO-3 shards the teacher stage left: never consolidated.

`load_sharded_teacher` builds the model exactly as the teacher stage did (inside `deepspeed.zero.Init`
through `HfDeepSpeedConfig`, so each rank only ever holds its partition), makes a DeepSpeed engine from
the teacher's resolved JSON (`ds/teacher.json`) and loads the checkpoint tag named in
`teacher/ckpt/complete.json`.

What DeepSpeed 0.19.8 does with a ZeRO-3 training checkpoint (checked here):
- `load_checkpoint(dir, tag, load_module_only=True)` returns the tag's path and raises nothing, but loads
  no weights: the module state in `zero_pp_rank_*_model_states.pt` holds size-0 placeholders for every
  partitioned parameter, and the fp32 partitions are never read. The model stays as initialised.
- `load_checkpoint(dir, tag, load_optimizer_states=False)` consolidates the full model on every rank from
  the `latest` file (ignoring `tag`): exactly what must not happen, and we write no `latest`.
- `load_checkpoint(dir, tag)` with optimizer states (the default) reads only this rank's
  `*zero_pp_rank_<r>_*optim_states.pt`, copies its fp32 partition into the optimizer and the bf16/fp32
  module partition: the real weights, partitioned. That is the call used here; an optimizer must be
  configured (an engine without one fails). The Adam moments it restores are dropped right
  after, and two checks make a silent no-load impossible: the engine's restored `global_steps` must equal
  the marker's step, and this rank's parameter partition must have changed.
- Another world size: the rigid load above refuses it. A universal checkpoint (`ds_to_universal`) loads
  at any world size with `"checkpoint": {"load_universal": true}` (weights only, `load_module_only`):
  the launching process makes `<tag>_universal` once and `checkpoint_source` picks it (both in
  model/teacher_checkpoint.py; checked: a 2-rank ZeRO-3 teacher loaded on 1 rank gives its Hugging Face export's logits exactly).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from stablekd.data_pipeline.errors import ConfigError
from stablekd.data_pipeline.files import read_marker
from stablekd.data_pipeline.tokenizer import load_tokenizer
from stablekd.ds_configs.resolve import zero_stage
from stablekd.model.build import build_model, generation_config
from stablekd.model.head import HeadRows, last_hidden
from stablekd.model.teacher_checkpoint import checkpoint_source
from stablekd.objectives.lm import HeadLoss


def inference_ds_config(teacher_ds: dict, world_size: int, universal: bool) -> dict:
    """The teacher's resolved DeepSpeed JSON, made valid for this job.

    Kept: ZeRO stage and partitioning, dtype, the optimizer (loading a ZeRO-3 training checkpoint needs
    one; it never steps). Changed: train_batch_size = micro × accum × this world (DeepSpeed
    checks the product), no DeepSpeed TensorBoard (it would write into the teacher's log directory),
    load_universal for a universal checkpoint.
    """
    ds = copy.deepcopy(teacher_ds)
    ds["train_batch_size"] = (
        ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * world_size
    )
    ds.pop("tensorboard", None)
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def local_digest(module: torch.nn.Module) -> torch.Tensor:
    """Sum and |sum| of this rank's own parameter storage (its ZeRO-3 partition), to see that a load changed it."""
    s = torch.zeros(2, dtype=torch.float64)
    for p in module.parameters():
        x = getattr(p, "ds_tensor", p).detach().double()  # ds_tensor: the partition ZeRO-3 keeps here
        s += torch.stack([x.sum(), x.abs().sum()])
    return s


@dataclass
class ShardedTeacher:
    """A teacher whose parameters stay partitioned over the job's ranks (under ZeRO-3).

    Every method runs forwards that gather parameters collectively: all ranks must call them the same
    number of times (`data_pipeline.online.lockstep` + `idle_forward`).
    """

    engine: Any  # DeepSpeedEngine
    tokenizer: Any
    checkpoint_id: str  # "teacher/ckpt/<tag>": recorded in the soft-label and candidate manifests
    tag: str  # the tag loaded (<tag>_universal at another world size)
    step: int
    zero3: bool

    @property
    def vocab_size(self) -> int:
        """The run's ids, len(tokenizer): padded embedding rows past it are cut off (launcher/models.py)."""
        return len(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> the whole [B, L, V] logits over the run's V = len(tokenizer) ids (the built model's head
        cuts padded rows: model/head.py; the engine's dtype: bf16 when the teacher trained in bf16). No
        training path asks for them (soft labels go through `head`, on-policy scoring through `hidden` and
        `head_rows`); tests compare against them."""
        with torch.no_grad():
            return self.engine(input_ids=input_ids.to(self.device), use_cache=False).logits

    def head(self, input_ids: torch.Tensor, head_loss: HeadLoss) -> torch.Tensor:
        """[B, L] -> Σ over row chunks of head_loss.fn on the logits the head makes one chunk at a time from
        the last hidden state (model/head.py), inside the head module's forward: under ZeRO-3 its weight is
        gathered once per call, and no [B, L, V] tensor exists. The soft-label writer and the online
        teacher encode chunk by chunk this way (data_pipeline/encodings.py, `encode_head`)."""
        with torch.no_grad():
            total, _ = self.engine(input_ids=input_ids.to(self.device), head_loss=head_loss)
        return total

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, H] the last hidden state, the head's input, through the engine (model/head.py
        `last_hidden`: the head runs on zero rows, so a forward gathers what a `head` forward gathers)."""
        with torch.no_grad():
            return last_hidden(self.engine, input_ids.to(self.device))

    def head_rows(self) -> HeadRows:
        """The head as a function of hidden rows (model/head.py `HeadRows`): under ZeRO-3 its parameters
        are gathered once per `with` block, at its first call (collective: every rank calls it alike)."""
        model = getattr(self.engine, "module", self.engine)  # an engine's model, or a plain model (tests)
        head = model.get_output_embeddings()
        gather = (lambda: deepspeed.zero.GatheredParameters(list(head.parameters()))) if self.zero3 else None
        return HeadRows(head, gather)

    def idle_forward(self) -> None:
        """One forward of a single EOS token through the trunk and the head, output discarded: this rank's
        share of a round it has no data for (the head path, as `head`: the same parameters gathered in the
        same order as a `logits` forward)."""
        eos = torch.tensor([[self.tokenizer.eos_token_id]])
        self.head(eos, HeadLoss(lambda z, rows: z.new_zeros(())))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`generate` under ZeRO-3: synced_gpus keeps each rank forwarding until every rank has finished
        (ranks may differ in batch size and max_new_tokens, not in the number of calls)."""
        synced = self.zero3 and dist.get_world_size() > 1
        with torch.no_grad():
            return self.engine.module.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                synced_gpus=synced,
                generation_config=generation_config(self.tokenizer, **kwargs),
            )

    def idle_generate(self) -> None:
        """A one-token generate from EOS: this rank's share of a round of generate calls it has no data for."""
        eos = torch.tensor([[self.tokenizer.eos_token_id]])
        self.generate(eos, torch.ones_like(eos), do_sample=False, max_new_tokens=1)


def load_sharded_teacher(
    ckpt_dir: Path, ds_path: Path, tokenizer_dir: Path, source: str, seq_len: int, seed: int
) -> ShardedTeacher:
    """The teacher whose checkpoints are in `ckpt_dir`, partitioned over this job's ranks exactly as
    training partitioned it.

    Args:
        ckpt_dir: the teacher stage's checkpoint directory (complete.json names the tag to load).
        ds_path: the teacher's resolved DeepSpeed JSON (ds/teacher.json).
        tokenizer_dir, source, seq_len, seed: what the teacher was built from (`model_source`), so the
            shapes match the checkpoint; the initial weights are overwritten by the load.

    Call on every rank after `engine.setup_distributed` (`artifacts.sharded_teacher(cfg)` passes a run's
    paths). Raises ConfigError when there is no complete teacher checkpoint or the world size differs
    and no universal checkpoint exists.
    """
    world = dist.get_world_size()
    marker, tag, universal = checkpoint_source(ckpt_dir, world)
    if not ds_path.is_file():
        raise ConfigError(
            f"{ds_path}: missing: the teacher's resolved DeepSpeed JSON (written by the teacher stage)"
        )
    ds = inference_ds_config(json.loads(ds_path.read_text()), world, universal)
    zero3 = zero_stage(ds) == 3
    # Alive while the model is built: transformers then constructs it inside deepspeed.zero.Init (as teacher.py).
    hf_ds = HfDeepSpeedConfig(ds) if zero3 else None  # noqa: F841
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_model(source, tokenizer, seq_len, seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    engine.eval()

    before = local_digest(engine.module)
    if universal:
        # Weights only: with load_universal DeepSpeed reads the fp32 fragments of this rank's slice.
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True)
    else:
        load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False)
        if engine.global_steps != marker["step"]:
            raise RuntimeError(
                f"{ckpt_dir / tag}: DeepSpeed restored global step {engine.global_steps}, complete.json says "
                f"{marker['step']}: the loaded state is not the tag named there"
            )
    if load_path is None or Path(load_path).parent.resolve() != (ckpt_dir / tag).resolve():
        raise RuntimeError(f"{ckpt_dir}: DeepSpeed loaded {load_path}, expected a file of tag {tag}")
    changed = torch.tensor([float(not torch.equal(before, local_digest(engine.module)))])
    dist.all_reduce(changed)
    if not changed.item():
        raise RuntimeError(f"{ckpt_dir / tag}: load_checkpoint left every rank's weights as initialised")
    base = getattr(engine.optimizer, "optimizer", None)
    if base is not None and hasattr(base, "state"):
        base.state.clear()  # Adam moments: 8 bytes per parameter and rank's share, never used for inference

    return ShardedTeacher(
        engine=engine,
        tokenizer=tokenizer,
        checkpoint_id=f"teacher/ckpt/{marker['tag']}",
        tag=tag,
        step=int(marker["step"]),
        zero3=zero3,
    )


def load_initial_weights(engine: Any, ckpt_dir: Path) -> dict:
    """Start a training engine from the weights of another run's ZeRO checkpoint (the tag its complete.json
    names), partitioned as they were saved; returns that marker. Call on every rank.

    The load is the optimizer-state one that restores the real partition (module docstring); what makes it
    a start rather than a resume comes after: the Adam moments are dropped, the optimizer keeps this run's
    hyperparameters (lr, weight decay; the schedule was not loaded), and DeepSpeed's step and sample
    counters restart at 0. Same world size and ZeRO stage as the saved run (`pipeline` checks the stage
    before ranks start); another world size is a ConfigError naming the exported model as the way out.
    """
    marker = read_marker(ckpt_dir)
    if marker is None:
        raise ConfigError(f"{ckpt_dir}/complete.json: missing: no complete checkpoint to start from")
    world = dist.get_world_size()
    if int(marker["world_size"]) != world:
        raise ConfigError(
            f"{ckpt_dir / marker['tag']} holds the ZeRO shards of {marker['world_size']} ranks but this job has "
            f"{world}: run with {marker['world_size']} ranks, or start from the exported model "
            f"(teacher.model={ckpt_dir.parent / 'hf'}), which loads at any world size"
        )
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    before = local_digest(engine.module)
    load_path, _ = engine.load_checkpoint(str(ckpt_dir), tag=marker["tag"], load_lr_scheduler_states=False)
    if load_path is None or Path(load_path).parent.resolve() != (ckpt_dir / marker["tag"]).resolve():
        raise RuntimeError(
            f"{ckpt_dir}: DeepSpeed loaded {load_path}, expected a file of tag {marker['tag']}"
        )
    changed = torch.tensor([float(not torch.equal(before, local_digest(engine.module)))])
    dist.all_reduce(changed)
    if not changed.item():
        raise RuntimeError(
            f"{ckpt_dir / marker['tag']}: load_checkpoint left every rank's weights as initialised"
        )
    base = getattr(engine.optimizer, "optimizer", None)
    if base is not None and hasattr(base, "state"):
        base.state.clear()  # fresh Adam moments: a fine-tuning run starts its own optimisation
    for group, saved in zip(engine.optimizer.param_groups, groups, strict=True):
        group.update(saved)
    engine.global_steps = engine.global_samples = 0
    return marker
