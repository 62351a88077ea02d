"""Optimizers from optax: Muon for the hidden matrices and AdamW for the rest (as in the paper), or AdamW only.

Hidden matrices are the 2-D projection weights inside the blocks. Embedding, output projection, norms, gate
biases and the depthwise conv kernel (2-D, but not a matrix acting on the residual stream) go to AdamW.
"""

from __future__ import annotations

import jax
import optax

from sleepjax.model import Params

OPTIMIZERS = ("muon", "adamw")


def is_hidden_matrix(path, leaf) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return leaf.ndim == 2 and "layers" in names and names[-1] != "conv"


def hidden_matrix_labels(params: Params):
    """A pytree like params: True where Muon applies."""
    return jax.tree_util.tree_map_with_path(is_hidden_matrix, params)


def schedule(peak: float, total_steps: int, warmup_steps: int, kind: str, final_fraction: float):
    """Linear warmup to ``peak`` then cosine decay to ``final_fraction * peak`` (or constant)."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)), optax.constant_schedule(peak)], [warmup_steps])
    warmup_steps = max(warmup_steps, 1)  # optax needs a warmup step and at least one decay step after it
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=final_fraction * peak)


def make_optimizer(cfg, schedule_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer of a ``train.TrainConfig``: ``cfg.optimizer="muon"``: Muon (``muon_lr``) on hidden matrices +
    AdamW (``adam_lr``) elsewhere; ``"adamw"``: AdamW at ``adam_lr`` on everything. Both with warmup + cosine (or
    constant) and global-norm clipping at ``grad_clip`` (0: none). The learning-rate schedule spans
    ``schedule_steps`` (default ``cfg.steps``) and stays at its final value after them (how an extended run trains
    its added steps)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    total_steps = schedule_steps or cfg.steps
    rate = lambda peak: schedule(peak, total_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.final_lr_fraction)
    if cfg.optimizer == "adamw":
        core = optax.adamw(rate(cfg.adam_lr), weight_decay=cfg.weight_decay)
    else:
        dims = lambda params: jax.tree_util.tree_map(
            lambda hidden: optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1) if hidden else None,
            hidden_matrix_labels(params))
        core = optax.contrib.muon(rate(cfg.muon_lr), adam_learning_rate=rate(cfg.adam_lr),
                                  weight_decay=cfg.weight_decay, adam_weight_decay=cfg.weight_decay,
                                  muon_weight_dimension_numbers=dims)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core) if cfg.grad_clip else core


def learning_rates(cfg, schedule_steps: int):
    """step -> {"adam_lr", ["muon_lr"]}: the rates ``make_optimizer(cfg, schedule_steps)`` applies at that
    (1-based) step, for the logs."""
    peaks = {"adam_lr": cfg.adam_lr, **({"muon_lr": cfg.muon_lr} if cfg.optimizer == "muon" else {})}
    fns = {k: schedule(v, schedule_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.final_lr_fraction)
           for k, v in peaks.items()}
    return lambda step: {k: float(fn(step - 1)) for k, fn in fns.items()}
