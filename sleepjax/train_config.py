"""TrainConfig: how to train (optimizer, schedule, evaluation, checkpoints, logging, mesh, fine-tuning), validated
on construction. ``sleepjax/train.py`` runs it; ``tests/test_config_fields.py`` names the test that shows each
field does what it says."""

from __future__ import annotations

import dataclasses
import fractions
import math

from sleepjax import finetune, optim

SCHEDULES = ("cosine", "constant")
EVAL_MODES = ("teacher_forced", "generate")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. ``eval_seed`` names the held-out stream (test split) scored every ``eval_every`` steps."""

    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    optimizer: str = "muon"
    muon_lr: float = 2e-3
    adam_lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    final_lr_fraction: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_size: int = 512
    eval_batch_size: int = 256
    eval_seed: int = 10_000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    mesh: str = ""
    # K micro-batches per optimizer step (batch_size / K sequences each, gradients summed): the update of the full
    # batch, for a fraction of its activation memory.
    grad_accum: int = 1
    # Fine-tuning (sleepjax/finetune.py): start from a pretrained checkpoint directory, with insert_gdn fresh GDN
    # layers; freeze="pretrained" trains only those layers for freeze_steps steps (0: the whole run).
    init_from: str = ""
    insert_gdn: int = 0
    insert_kind: str = "gdn"  # what insert_gdn inserts: "gdn" layers, or "jet" (JetBlocks, the paper's Ouro runs)
    freeze: str = "none"
    freeze_steps: int = 0
    # A sliding-eviction model trains with hard eviction for its first warmup_eviction_steps steps (the paper's
    # warm-up, which it calls crucial for N > 1).
    warmup_eviction_steps: int = 0
    # A fixed training set (the paper counts epochs): train_examples K > 0 trains on examples 0 .. K-1 of the train
    # split only, each epoch in its own order (a pure function of seed and epoch: sleepjax/tasks/base.py,
    # batch_indices); 0 = an endless stream of fresh examples. epochs > 0 REPLACES steps with
    # ceil(epochs * K / batch_size); warmup_epochs > 0 REPLACES warmup_eviction_steps, and with freeze="pretrained"
    # also freeze_steps, with round(warmup_epochs * K / batch_size) (the paper's sliding recipe: one epoch of only
    # the new layers under hard eviction, then everything under sliding eviction). Both need train_examples.
    train_examples: int = 0
    # N-robust training: each step's sleep passes drawn from this set of N ("lo:hi" = lo..hi, or "1,2,4,8"), a pure
    # function of (seed, step); one compiled step serves them all (the model's sleep_n must be the largest), and
    # every evaluation also scores each N of the set (exact@N=k, loss@N=k). "": every step runs the model's sleep_n.
    sleep_n_sample: str = ""
    # "generate": every evaluation also scores answers by free greedy generation (exact_generated, beside the
    # teacher-forced exact), the prompt consumed as inference does; eval_generation_sleep says which windows sleep
    # then ("always": every full window, as at inference; "unsupervised": as in training).
    eval_mode: str = "teacher_forced"
    eval_generation_sleep: str = "always"
    epochs: float = 0.0
    warmup_epochs: float = 0.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_size", "eval_batch_size", "checkpoint_every",
                     "keep_checkpoints", "log_every", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("muon_lr", "adam_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0")
        if self.optimizer not in optim.OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {optim.OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(f"final_lr_fraction must lie in [0, 1], got {self.final_lr_fraction}")
        for name in ("insert_gdn", "freeze_steps", "warmup_eviction_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.insert_kind not in ("gdn", "jet"):
            raise ValueError(f"insert_kind must be 'gdn' or 'jet', got {self.insert_kind!r}")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.eval_generation_sleep not in ("always", "unsupervised"):
            raise ValueError(f"eval_generation_sleep must be 'always' or 'unsupervised', got "
                             f"{self.eval_generation_sleep!r}")
        if self.freeze not in finetune.FREEZE:
            raise ValueError(f"freeze must be one of {finetune.FREEZE}, got {self.freeze!r}")
        if self.freeze != "none" and not self.insert_gdn:
            raise ValueError("freeze='pretrained' needs insert_gdn > 0: it trains only the inserted layers")
        if self.insert_gdn and not self.init_from:
            raise ValueError("insert_gdn needs init_from (the pretrained checkpoint to insert layers into)")
        self._derive_from_epochs()
        self.sleep_n_set  # validates sleep_n_sample

    @property
    def sleep_n_set(self) -> tuple[int, ...]:
        """The Ns of ``sleep_n_sample``, sorted (empty when off)."""
        spec = self.sleep_n_sample
        if not isinstance(spec, str):
            raise ValueError(f"sleep_n_sample must be a string ('lo:hi' or 'a,b,...'), got {spec!r}")
        if not spec.strip():
            return ()
        try:
            if ":" in spec:
                lo, hi = (int(x) for x in spec.split(":"))
                values = tuple(range(lo, hi + 1))
            else:
                values = tuple(sorted({int(x) for x in spec.split(",")}))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise ValueError(f"sleep_n_sample must be 'lo:hi' (1 <= lo <= hi) or a list 'a,b,...' of ints >= 1, "
                             f"got {spec!r}")
        return values

    def sleep_passes_at(self, step: int) -> int:
        """The N step ``step`` + 1 trains with under ``sleep_n_sample``: a pure function of (seed, step)."""
        from sleepjax.tasks.base import example_rng

        values = self.sleep_n_set
        return int(values[example_rng(self.seed, step, "train", "sleep_n_sample").integers(len(values))])

    def _derive_from_epochs(self) -> None:
        """train_examples / epochs / warmup_epochs: validated, then the step counts they set."""
        K = self.train_examples
        if not isinstance(K, int) or isinstance(K, bool) or K < 0:
            raise ValueError(f"train_examples must be an int >= 0 (0: an endless stream), got {K!r}")
        for name in ("epochs", "warmup_epochs"):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                    or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
            if value > 0 and not K:
                raise ValueError(f"{name} ({value}) needs train_examples > 0: epochs count passes over a fixed "
                                 f"training set")

        def steps_of(epochs) -> fractions.Fraction:  # exact: 0.1 epoch of 30 examples at 3 a batch is 1 step, not 2
            return fractions.Fraction(str(epochs)) * K / self.batch_size

        if self.epochs > 0:
            object.__setattr__(self, "steps", math.ceil(steps_of(self.epochs)))
        if self.warmup_epochs > 0:
            if self.epochs > 0 and not self.warmup_epochs < self.epochs:
                raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}): the "
                                 "warm-up is the first phase of the run")
            warmup = round(steps_of(self.warmup_epochs))
            if warmup < 1:
                raise ValueError(f"warmup_epochs ({self.warmup_epochs}) x train_examples ({K}) / batch_size "
                                 f"({self.batch_size}) rounds to 0 steps: no warm-up at all")
            object.__setattr__(self, "warmup_eviction_steps", warmup)
            if self.freeze == "pretrained":
                object.__setattr__(self, "freeze_steps", warmup)
