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


def make_optimizer(*, name: str, total_steps: int, muon_lr: float, adam_lr: float, warmup_steps: int,
                   schedule_kind: str = "cosine", final_lr_fraction: float = 0.1, weight_decay: float = 0.0,
                   grad_clip: float | None = 1.0) -> optax.GradientTransformation:
    """``name="muon"``: Muon (lr ``muon_lr``) on hidden matrices + AdamW (``adam_lr``) elsewhere.
    ``name="adamw"``: AdamW at ``adam_lr`` on everything. Both with warmup + cosine and global-norm clipping."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    adam_schedule = schedule(adam_lr, total_steps, warmup_steps, schedule_kind, final_lr_fraction)
    if name == "adamw":
        core = optax.adamw(adam_schedule, weight_decay=weight_decay)
    else:
        dims = lambda params: jax.tree_util.tree_map(
            lambda hidden: optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1) if hidden else None,
            hidden_matrix_labels(params))
        core = optax.contrib.muon(
            schedule(muon_lr, total_steps, warmup_steps, schedule_kind, final_lr_fraction),
            adam_learning_rate=adam_schedule, weight_decay=weight_decay, adam_weight_decay=weight_decay,
            muon_weight_dimension_numbers=dims)
    return optax.chain(optax.clip_by_global_norm(grad_clip), core) if grad_clip else core
