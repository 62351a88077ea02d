"""Fine-tuning a pretrained model with sleep: where its parameters come from and which of them train. (The
hard-eviction warm-up of a sliding-eviction model is ``train.train_step``'s ``hard_eviction``.)

The training loop (``train.py``) calls these; each is a pure function of the configs.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from sleepjax.config import ModelConfig
from sleepjax.model import Params

FREEZE = ("none", "pretrained")


def pretrained_params(path: str | os.PathLike, model_cfg: ModelConfig, insert_gdn: int, seed: int,
                      insert_kind: str = "gdn") -> Params:
    """The checkpoint at ``path`` as float32 Params of ``model_cfg`` (which must describe the same weights: what the
    checkpoint's config gives, plus ``insert_gdn`` fresh layers drawn from ``seed``, plus overrides that change no
    shape such as window, sleep_n, sleep_layers, eviction, dtype or remat)."""
    from sleepjax import pretrained

    params = pretrained.load(path, insert_gdn=insert_gdn, insert_kind=insert_kind, key=jax.random.PRNGKey(seed))
    loaded = params.config
    shapes = {f.name for f in dataclasses.fields(ModelConfig)} - {
        "window", "sleep_n", "sleep_layers", "eviction", "dtype", "remat", "gdn_backend", "attn_backend",
        "chunk_size", "ssm_rule"}
    differ = sorted(name for name in shapes if getattr(loaded, name) != getattr(model_cfg, name))
    if differ:
        raise ValueError(f"init_from {str(path)!r}: the model config differs from the checkpoint's in "
                         f"{', '.join(differ)} (only window, sleep_n, sleep_layers, eviction, dtype, remat and the "
                         f"kernel backends may be overridden)")
    return params.replace(config=model_cfg)


def inserted_layers(model_cfg: ModelConfig, insert_gdn: int) -> tuple[int, ...]:
    """Indices of the layers ``insert_gdn`` added to a pretrained stack."""
    from sleepjax.pretrained import inserted_positions

    return inserted_positions(len(model_cfg.layers) - insert_gdn, insert_gdn) if insert_gdn else ()


def frozen_mask(params: Params, freeze: str, trainable_layers: tuple[int, ...]):
    """A pytree of bools like ``params``: True where a parameter is frozen. ``freeze="pretrained"``: everything
    but the layers in ``trainable_layers`` (embeddings, norms and pretrained blocks included)."""
    if freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {freeze!r}")
    if freeze == "none":
        return jax.tree_util.tree_map(lambda _: False, params)
    if not trainable_layers:
        raise ValueError("freeze='pretrained' leaves nothing to train: insert layers (insert_gdn) to train first")

    def frozen(path, _):
        keys = [getattr(k, "name", getattr(k, "idx", getattr(k, "key", None))) for k in path]
        return not (len(keys) > 1 and keys[0] == "layers" and keys[1] in trainable_layers)

    return jax.tree_util.tree_map_with_path(frozen, params)


def hold_frozen(tree, mask, step, until: int):
    """Zeros the leaves of ``tree`` (gradients or updates) that ``mask`` freezes while ``step < until`` (until <= 0:
    for the whole run). Zeroing both gradients and updates keeps frozen weights exactly where they are (decoupled
    weight decay would otherwise still move them) and their optimizer moments at zero until they thaw."""
    active = jnp.asarray(True) if until <= 0 else step < until
    return jax.tree_util.tree_map(lambda x, m: jnp.where(active & m, jnp.zeros_like(x), x) if m else x, tree, mask)
