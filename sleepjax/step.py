"""The pure train step: the train state, the loss and its gradients over micro-batches, one optimizer update.
``train.py`` jits it per sleep schedule and runs the loop around it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from sleepjax import finetune
from sleepjax import model as model_lib
from sleepjax import mesh as mesh_lib
from sleepjax.config import ModelConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: model_lib.Params
    opt_state: Any


def init_train_state(model_cfg: ModelConfig, cfg, tx, params=None) -> TrainState:
    """Step 0 of a ``train.TrainConfig`` ``cfg``: fresh parameters from ``cfg.seed``, or ``params`` (e.g. a
    pretrained checkpoint's), and the optimizer state of ``tx``."""
    params = model_lib.init(model_cfg, jax.random.PRNGKey(cfg.seed)) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_state_shardings(abstract_state, model_cfg: ModelConfig, mesh):
    """Parameters and the optimizer moments that mirror them sharded by the logical-axis rules
    (``mesh_lib.LOGICAL_RULES``); step counters and scalars replicated."""
    return mesh_lib.tree_shardings(abstract_state, mesh, lambda path: model_lib.logical_axes_at(path, model_cfg))


def _micro_batches(x, k: int):
    """[B, ...] -> [k, B / k, ...]: micro-batch i holds rows i, i + k, i + 2k, ... so that each device of a
    batch-sharded mesh contributes the same number of rows to every micro-batch."""
    return x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)


def loss_and_grads(params, tokens, loss_mask, *, schedule: str | None = None, grad_accum: int = 1,
                   sleep_passes=None):
    """(metrics, gradients) of the masked mean cross-entropy of a batch, computed over ``grad_accum``
    micro-batches: each contributes its summed cross-entropy divided by the WHOLE batch's supervised count, so the
    summed gradients are the full batch's (up to float rounding). Metrics as ``model.loss`` gives them.
    ``sleep_passes`` (int32 scalar, may be traced): the sleep passes of this batch (N-robust training samples it
    per step; at most the model's sleep_n), None = sleep_n."""
    count = jnp.maximum(jnp.asarray(loss_mask)[:, :-1].sum(), 1).astype(jnp.float32)

    def micro(params, tokens, loss_mask):
        ce, correct, mask, passes = model_lib.token_stats(params, tokens, loss_mask, schedule=schedule,
                                                          return_passes=True, sleep_passes=sleep_passes)
        total = (ce * mask).sum()
        return total / count, {"ce": total, "correct": (correct * mask).sum(), "supervised": mask.sum(),
                               **model_lib.sleep_counts(params.config, loss_mask, passes, sleep_passes)}

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, tokens, loss_mask)
    else:
        def body(acc, xs):
            (_, sums), grads = grad_fn(params, *xs)
            return jax.tree_util.tree_map(jnp.add, acc, (grads, sums)), None

        xs = (_micro_batches(tokens, grad_accum), _micro_batches(jnp.asarray(loss_mask), grad_accum))
        (_, sums), grads = jax.eval_shape(grad_fn, params, *(x[0] for x in xs))
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (grads, sums))
        (grads, sums), _ = jax.lax.scan(body, zeros, xs)
    metrics = {"loss": sums["ce"] / count, "accuracy": sums["correct"] / count,
               **{k: v for k, v in sums.items() if k not in ("ce", "correct")}}
    return metrics, grads


def train_step(state: TrainState, batch: dict, sleep_passes=None, *, tx, sleep_schedule: str | None = None,
               grad_accum: int = 1, frozen=None, freeze_steps: int = 0,
               hard_eviction: bool = False) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` (tokens, loss_mask) run with ``sleep_schedule`` (one letter per
    window, ``sleepjax/schedule.py``; it must fit the batch; None: M everywhere, right for any batch at N passes
    per window) over ``grad_accum`` micro-batches. Pure: returns the new state and metrics.

    frozen: a pytree of bools like the params (``finetune.frozen_mask``): those parameters stay put while
    ``state.step < freeze_steps`` (0: always). hard_eviction: compute the loss with hard eviction whatever the
    model's policy (the warm-up of a sliding-eviction model). sleep_passes: as in ``loss_and_grads`` (a traced
    argument: one compiled step for every N of an N-robust run)."""
    params = state.params
    loss_params = params.replace(config=params.config.replace(eviction="hard")) if hard_eviction else params
    metrics, grads = loss_and_grads(loss_params, batch["tokens"], batch["loss_mask"], schedule=sleep_schedule,
                                    grad_accum=grad_accum, sleep_passes=sleep_passes)
    grads = grads.replace(config=params.config)
    if frozen is not None:
        grads = finetune.hold_frozen(grads, frozen, state.step, freeze_steps)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    if frozen is not None:
        updates = finetune.hold_frozen(updates, frozen, state.step, freeze_steps)
    params = optax.apply_updates(params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def memory_summary(step_fn, state, batch_abstract, mesh, model_cfg: ModelConfig, cfg) -> str:
    """One line: parameter count and XLA's estimate of one train step's memory per device (arguments: parameters,
    optimizer state and the batch shard; temporaries: activations kept for the backward and workspace)."""
    with jax.set_mesh(mesh):
        sampled = (jax.ShapeDtypeStruct((), jnp.int32),) if cfg.sleep_n_set else ()  # N-robust: the step's N
        analysis = step_fn.lower(state, batch_abstract, *sampled).compile().memory_analysis()
    count = model_lib.num_params(state.params)
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}k"
    head = f"model: {size} parameters; N = {model_cfg.sleep_n}, batch {cfg.batch_size}, mesh {dict(mesh.shape)}"
    if analysis is None:
        return head + "; this backend gives no memory estimate"
    gb = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"
    return (f"{head}; train step per device: {gb(analysis.argument_size_in_bytes)} parameters + optimizer state "
            f"+ batch, {gb(analysis.temp_size_in_bytes)} temporaries (remat={model_cfg.remat})")
