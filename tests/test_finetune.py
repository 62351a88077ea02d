"""Fine-tuning with sleep: a run starts from a pretrained checkpoint (plus inserted GDN layers), --freeze keeps the
pretrained weights exactly where they are, and a sliding-eviction model warms up with hard eviction."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close
from helpers.runs import micro_setup
from sleepjax import finetune, pretrained, tasks
from sleepjax.train import TrainConfig, load_run, train

FIXTURE = Path(__file__).parent / "fixtures" / "qwen3"


def pretrained_setup(tmp_path, **train_fields):
    task = tasks.get("rule110", width=6, strings=2, t=1)  # 4 token ids: inside the checkpoint's vocabulary of 128
    model_cfg = pretrained.load_config(FIXTURE, insert_gdn=2, window=task.window, sleep_n=2)
    cfg = TrainConfig(**{**dict(steps=4, batch_size=8, muon_lr=0.02, adam_lr=3e-3, warmup_steps=1, eval_every=4,
                                eval_size=8, eval_batch_size=8, checkpoint_every=4, log_every=1,
                                init_from=str(FIXTURE), insert_gdn=2), **train_fields})
    return task, model_cfg, cfg


@pytest.mark.slow
def test_freeze_pretrained_trains_only_inserted_layers(tmp_path):
    """Catches a freeze that only zeroes gradients (weight decay would still move frozen weights) or a mask that
    misses the embeddings/norms."""
    task, model_cfg, cfg = pretrained_setup(tmp_path, freeze="pretrained", weight_decay=0.1)
    train(task, model_cfg, cfg, tmp_path)
    params = load_run(tmp_path)[0]
    start = pretrained.load(FIXTURE, insert_gdn=2, key=jax.random.PRNGKey(cfg.seed))
    inserted = finetune.inserted_layers(model_cfg, 2)
    assert inserted == (1, 3) and params.config.layers == ("attn", "gdn", "attn", "gdn", "attn")
    for i, (a, b) in enumerate(zip(params.layers, start.layers)):
        moved = max(float(jnp.abs(a[k] - b[k]).max()) for k in ("w_qkv", "wo", "wq") if k in a)
        assert (moved > 0) == (i in inserted), (i, moved)
    np.testing.assert_array_equal(params.embed, start.embed)
    np.testing.assert_array_equal(params.final_norm, start.final_norm)


@pytest.mark.slow
def test_freeze_steps_then_everything_trains(tmp_path):
    task, model_cfg, cfg = pretrained_setup(tmp_path, freeze="pretrained", freeze_steps=2)
    train(task, model_cfg, cfg, tmp_path)
    params = load_run(tmp_path)[0]
    start = pretrained.load(FIXTURE, insert_gdn=2)
    assert float(jnp.abs(params.layers[0]["wq"] - start.layers[0]["wq"]).max()) > 0


def test_init_from_starts_at_the_checkpoint_and_is_recorded(tmp_path):
    """Step 0 of a fine-tuning run evaluates the pretrained weights, not a random init; config.json says where the
    weights came from, and a different model config is refused naming the field."""
    task, model_cfg, cfg = pretrained_setup(tmp_path, steps=1, eval_every=1)
    train(task, model_cfg, cfg, tmp_path)
    _, saved_model, saved_train, _ = load_run(tmp_path)
    assert saved_train.init_from == str(FIXTURE) and saved_train.insert_gdn == 2 and saved_model == model_cfg
    with pytest.raises(ValueError, match="differs from the checkpoint's in d_model"):
        finetune.pretrained_params(FIXTURE, model_cfg.replace(d_model=32), 2, 0)
    with pytest.raises(ValueError, match="insert_gdn needs init_from"):
        TrainConfig(insert_gdn=1)
    with pytest.raises(ValueError, match="freeze='pretrained' needs insert_gdn"):
        TrainConfig(init_from="x", freeze="pretrained")


@pytest.mark.slow
def test_sliding_warmup_trains_with_hard_eviction_first(tmp_path):
    """With warmup_eviction_steps >= steps a sliding-eviction run is exactly the hard-eviction run; without the
    warm-up it differs (catches a warm-up flag that is ignored)."""
    task, model_cfg, cfg = micro_setup(steps=3, eval_every=3, checkpoint_every=3)
    sliding = model_cfg.replace(eviction="sliding")
    runs = {}
    for name, m, warm in (("hard", model_cfg, 0), ("warm", sliding, 3), ("sliding", sliding, 0)):
        train(task, m, TrainConfig(**{**cfg.__dict__, "warmup_eviction_steps": warm}), tmp_path / name)
        runs[name] = load_run(tmp_path / name)[0]
    assert_trees_close(runs["warm"].replace(config=model_cfg), runs["hard"], 0.0, "warm-up = hard")
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(runs["sliding"]),
                                                           jax.tree_util.tree_leaves(runs["hard"])))
    assert diff > 0
