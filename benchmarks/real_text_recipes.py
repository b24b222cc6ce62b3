"""The recipes of benchmarks/real_text.py, as plain data: the teacher's pre-training, the soft-label runs of
the one teacher, and each student, on-policy and contrastive arm with its overrides (module doc of
real_text.py), and the goals the run is judged by."""

from __future__ import annotations

# Pre-training on the prose alone: 1,600 x 16 x 256 = 6.6M tokens ≈ 5.7 passes of the training books
PRETRAIN = ["teacher.max_steps=1600", "teacher.lr=2.0e-3", "teacher.warmup_steps=100"]
# Soft-label runs of the one teacher: name -> overrides. "sampled" is the teacher's own run (OUT/teacher);
# any other is OUT/teacher_<name>, whose teacher/ links the finished teacher's.
# Candidate groups for the contrastive arms: the first 768 task records of mixed.jsonl (each of its 768
# training questions once; no prose half, which would widen every stored context to ~220 tokens), 6 teacher
# samples each at the probe's temperature (its samples' wrong answers are the hard negatives) + the
# reference; answers are a few tokens. Its soft-label stream is the contrastive stage's KD anchor, labelled
# for exactly the sequences the stage reads (CONTRASTIVE_STEPS x CONTRASTIVE_MICRO: no pass repeated).
CONTRASTIVE_STEPS, CONTRASTIVE_MICRO = 192, 8  # 2 passes over the 768 groups
CANDIDATES = [
    "soft_labels.candidates=true", "soft_labels.candidate_tasks_only=true", "soft_labels.candidate_contexts=768",
    "soft_labels.candidates_per_context=6", "soft_labels.sample_temperature=1.0", "soft_labels.max_new_tokens=16",
    "soft_labels.generate_batch_size=96", f"soft_labels.max_sequences={CONTRASTIVE_STEPS * CONTRASTIVE_MICRO}",
]  # fmt: skip
LABELS = {"sampled": [], "topk": ["soft_labels.encoding=topk"], "candidates": CANDIDATES}
XTOK_ALPHA = 0.5  # as benchmarks/cross_tokenizer.py's hybrid arm
# arm -> (its LABELS run, distill.alpha, the student's tokenizer: the run's, or "bpe": one of its own)
ARMS = {
    "student": ("sampled", 1.0, "run"), "ce_twin": ("sampled", 0.0, "run"), "student_topk": ("topk", 1.0, "run"),
    "xtok_ce": ("sampled", 0.0, "bpe"), "xtok_hybrid": ("sampled", XTOK_ALPHA, "bpe"),
}  # fmt: skip
GOAL_XTOK_SHARE = 0.5
# on-policy arm -> (the ARMS arm whose export it fine-tunes, on that arm's soft labels and alpha; steps; distill.*
# overrides). λ 0.5, GKD's mixing rather than λ 1: every second micro-batch is the student's own continuation
# of a record's first 32 tokens, scored by the teacher (distill.kind on each generated token), the others the
# offline soft labels of whole 256-token records, which hold its bits per byte (the goal allows +2 %) while its
# samples correct what it generates. lr and warm-up: the contrastive stage's for fine-tuning a trained student.
# It reads the soft labels from their first record again (the student's 1,000 steps read them all); a step
# took ~0.9 s (an on-policy micro-batch: sampling 0.44 s, the teacher's scoring 0.11 s) on 2 loaded cores.
# `on_policy_cold` samples at T 0.3 for 64 tokens: rep-4 is measured on greedy 64-token continuations, and
# samples at T 1 are diverse (distinct-2 ~0.94), so at T 1 the student never visits the loops its greedy
# decoding falls into, where the teacher's scores would pull it out of them.
_ON_POLICY_RUN = ["distill.on_policy=0.5", "distill.lr=3.0e-4", "distill.warmup_steps=10"]
_COLD = ["distill.on_policy_temperature=0.3", "distill.on_policy_new_tokens=64"]
ON_POLICY = {
    "on_policy": ("student", 128, _ON_POLICY_RUN),
    "on_policy_cold": ("student", 256, [*_ON_POLICY_RUN, *_COLD]),
    "on_policy_cold_long": ("student", 768, [*_ON_POLICY_RUN, *_COLD]),  # cold moved rep-4 88.7 -> 85.8 in 256
    # the divergence on its own samples (GKD's finding: mode-seeking ones help on-policy), else as _cold
    "on_policy_rkl": ("student", 256, [*_ON_POLICY_RUN, *_COLD, "distill.on_policy_kind=rkl"]),
    "on_policy_gjsd": ("student", 256, [*_ON_POLICY_RUN, *_COLD, "distill.on_policy_kind=gjsd"]),
    # λ 1 (GKD's fully on-policy setting): every micro-batch is the student's own sample, else as _cold
    "on_policy_all": ("student", 256, ["distill.on_policy=1.0", *_ON_POLICY_RUN[1:], *_COLD]),
    # the prompt source: the questions of mixed.jsonl's task records (its training questions, none held out)
    # instead of record starts: the teacher scores the student's own answers; else as _cold
    "on_policy_tasks": ("student", 256, [*_ON_POLICY_RUN, *_COLD, "distill.on_policy_prompts=tasks"]),
    # from scratch (start ""): the student's 1,000 steps at its own lr, λ ramped from 0 to 0.5 over the first
    # 500 (its samples are noise until it has learnt something); its bits per byte against `student`'s
    "on_policy_scratch": ("", 1000, ["distill.on_policy=0.5", "distill.on_policy_warmup_steps=500", *_COLD]),
}  # fmt: skip
# contrastive arm -> (its LABELS run, the arm whose export it starts from, contrastive.* overrides); the
# likelihood scorer, reference labels (every group has one), the KD anchor at contrastive.lam.
# contrastive_sharp: a context's own rows only (its samples' wrong answers are the negatives that make a
# contradiction; other questions' answers are easy ones) at tau 0.2: with tau 1 the first setting raised
# exact match but left the samples' contradiction where it was, bits per byte within 0.3 % (anchor kept).
_CONTRASTIVE_RUN = [
    f"contrastive.max_steps={CONTRASTIVE_STEPS}",
    f"contrastive.micro_batch_size={CONTRASTIVE_MICRO}",
]
CONTRASTIVE = {
    "contrastive": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0", "contrastive.negatives=8"]),
    "contrastive_sharp": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0", "contrastive.negatives=0",
                                                    "contrastive.tau=0.2"]),
    # the same own-rows arm pushed harder: 3.3x the lr, tau 0.1 (contrastive_sharp left agreement where it was)
    "contrastive_strong": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0", "contrastive.negatives=0",
                                                     "contrastive.tau=0.1", "contrastive.lr=1.0e-3"]),
    # model-scored hard-negative mining: `contrastive`, but only the 3 negatives (of its own wrong samples and
    # 8 other contexts') the student scores highest count: the answers it would give, not the easy ones
    "contrastive_mined": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0",
                                                    "contrastive.negatives=8", "contrastive.hard_negatives=3"]),
    # the student's own samples as candidates (contrastive.own_samples): 4 per context per micro-batch, drawn as
    # the probe draws (T 1, top_p 0.95), judged by the reference: its own wrong answers are its hard negatives;
    # else as `contrastive`, and with the mining of `contrastive_mined`
    "contrastive_own": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0",
                                                  "contrastive.negatives=8", "contrastive.own_samples=4"]),
    "contrastive_own_mined": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0",
                                                        "contrastive.negatives=8", "contrastive.own_samples=4",
                                                        "contrastive.hard_negatives=3"]),
    # twice as long (4 passes over the 768 questions; the share of its own samples it got right was still
    # rising after 2), else as contrastive_own_mined
    "contrastive_own_long": ("candidates", "student", ["contrastive.max_steps=384",
                                                       f"contrastive.micro_batch_size={CONTRASTIVE_MICRO}",
                                                       "contrastive.lam=1.0", "contrastive.negatives=8",
                                                       "contrastive.own_samples=4", "contrastive.hard_negatives=3"]),
    # the KD anchor at lam 0.3: at lam 1 it holds the student's answers at the teacher's spread (the teacher's
    # own samples disagree on 0.96 of the questions); else as contrastive_own_mined
    "contrastive_own_loose": ("candidates", "student", [*_CONTRASTIVE_RUN, "contrastive.lam=0.3",
                                                        "contrastive.negatives=8", "contrastive.own_samples=4",
                                                        "contrastive.hard_negatives=3"]),
    "on_policy_contrastive": ("candidates", "on_policy", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0",
                                                          "contrastive.negatives=8"]),
    # the student with its own tokenizer: candidate groups and the KD anchor realigned to its ids
    # (contrastive_arms adds its student.model and the hybrid loss at its alpha)
    "xtok_contrastive": ("candidates", "xtok_hybrid", [*_CONTRASTIVE_RUN, "contrastive.lam=1.0",
                                                       "contrastive.negatives=8"]),
}  # fmt: skip
GOAL_COMPRESSOR_SHARE = 0.8
GOAL_FACT_EM = 0.6
GOAL_STUDENT_EM_SHARE = 0.95
# issue #28: each contrastive arm against the arm it starts from
GOAL_CONTRADICTION_SHARE, GOAL_PARAPHRASE_SHARE, GOAL_EM_DROP, GOAL_BPB_SHARE = 0.5, 0.75, 0.01, 1.02
