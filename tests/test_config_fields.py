"""Every configuration field does what it says: for each field of TrainConfig (sleepjax/train_config.py) and
ModelConfig (sleepjax/config.py), a test that fails if the field were ignored (left at its default, or dropped
on its way to where it acts). The table names that test; the ones marked NEW are in this file.

TrainConfig field      test that fails if it is ignored
---------------------  --------------------------------------------------------------------------------------------
steps                  test_train.py::test_training_lowers_the_loss_and_writes_outputs (rows end at step 40);
                       test_train_preemption.py::test_larger_steps_extends_finished_and_interrupted_runs_alike
batch_size             test_train_grad_accum.py::test_train_with_grad_accum_and_the_sleep_it_reports (example-windows
                       counted by the model = steps x batch x windows)
seed                   NEW test_seed_draws_the_initial_parameters_and_the_batches
optimizer              NEW test_one_update_moves_each_parameter_by_its_optimizers_rate (adamw: every |step| <= adam_lr;
                       muon: hidden matrices move by far more)
muon_lr, adam_lr       NEW test_one_update_moves_each_parameter_by_its_optimizers_rate (2x muon_lr doubles the hidden
                       matrices' step, 3x adam_lr triples every other)
weight_decay           NEW test_weight_decay_pulls_every_parameter_towards_zero
warmup_steps           NEW test_the_learning_rates_applied_are_the_schedule (warmup 0: the first update is at the
                       peak; warmup 3: linear from 0); NEW test_train_runs_the_optimizer_of_its_config
lr_schedule            NEW test_the_learning_rates_applied_are_the_schedule (constant vs cosine);
                       NEW test_one_update_moves_each_parameter_by_its_optimizers_rate (constant: no zero first step)
final_lr_fraction      NEW test_the_learning_rates_applied_are_the_schedule (the last rate, and every rate after it,
                       is final_lr_fraction x peak); NEW test_train_runs_the_optimizer_of_its_config;
                       test_train_preemption.py::test_larger_steps_extends_finished_and_interrupted_runs_alike (logged)
grad_clip              NEW test_grad_clip_scales_the_gradient_before_the_optimizer
eval_every             test_train.py::test_training_lowers_the_loss_and_writes_outputs (evaluations at 20 and 40)
eval_size              NEW test_the_held_out_set_is_eval_size_items_of_eval_seed_in_eval_batch_size_batches
eval_batch_size        NEW test_the_held_out_set_is_eval_size_items_of_eval_seed_in_eval_batch_size_batches
eval_seed              NEW test_the_held_out_set_is_eval_size_items_of_eval_seed_in_eval_batch_size_batches
checkpoint_every       test_train_preemption.py::test_final_step_is_checkpointed_and_restarting_a_finished_run_trains_nothing
                       (checkpoints at 10, 20 and the final 25)
keep_checkpoints       NEW test_keep_checkpoints_keeps_only_the_newest
log_every              test_train_preemption.py::test_sigterm_saves_exits_75_and_the_resumed_run_is_the_uninterrupted_one
                       (train rows at every multiple of 3); test_train.py (the first row at step 5)
mesh                   test_train.py::test_workdir_and_mesh_errors (data:3 on one device is refused);
                       test_train_distributed.py::test_meshes_match_one_device_and_checkpoints_move_between_meshes
grad_accum             NEW test_grad_accum_reaches_the_step; test_train_grad_accum.py (the step's micro-batches)
init_from              test_finetune.py::test_freeze_pretrained_trains_only_inserted_layers (frozen weights are
                       the checkpoint's)
insert_gdn             test_finetune.py::test_freeze_pretrained_trains_only_inserted_layers (layers 1 and 3 inserted)
insert_kind            test_experiments_paper_runs.py::test_presets_build_the_papers_settings (JetBlocks inserted
                       through the launcher); test_pretrained_ouro.py::test_inserted_jet_blocks_keep_the_logits
freeze                 test_finetune.py::test_freeze_pretrained_trains_only_inserted_layers
freeze_steps           test_finetune.py::test_freeze_steps_then_everything_trains
warmup_eviction_steps  test_finetune.py::test_sliding_warmup_trains_with_hard_eviction_first
train_examples         test_train_epochs.py::test_train_runs_the_epochs_over_the_fixed_set (only examples 0..5
                       drawn); test_train_epochs.py::test_rows_are_slices_of_the_full_batch (the trainer's batches)
epochs                 test_train_epochs.py::test_train_runs_the_epochs_over_the_fixed_set (3 steps, not 40);
                       test_train_epochs.py::test_epochs_set_the_steps_and_bad_settings_are_named
sleep_n_sample         test_train_n_robust.py::test_n_robust_run_compiles_one_step_and_evaluates_every_n (loss@N=k
                       differ per N; one compiled step)
eval_mode, eval_generation_sleep
                       test_train_eval_mode.py::test_generate_eval_mode_logs_generated_accuracy
warmup_epochs          test_train_epochs.py::test_epochs_set_the_steps_and_bad_settings_are_named (sets
                       warmup_eviction_steps, and freeze_steps when freeze="pretrained", whose rows are above)

ModelConfig field      test that fails if it is ignored
---------------------  --------------------------------------------------------------------------------------------
vocab_size, d_model, layers, attn_heads, attn_kv_heads, attn_head_dim, gdn_heads, gdn_value_heads, gdn_key_dim,
gdn_value_dim, conv_size, mlp_dim, window, sleep_n, ssm_rule, rope_theta, norm_eps, eviction, sleep_layers,
attn_output_gate, qk_norm, rope_dim, norm_weight_offset, mlp_free_layers, tie_embeddings
                       NEW test_every_model_field_off_its_default_matches_the_reference (all of them at once, each
                       away from its default, against the float64 NumPy reference); also test_model_reference.py
attn_bias, swa_window, jet_heads, jet_key_dim, jet_value_dim, jet_conv_size, jet_conv_reduction, jet_norm_eps
                       test_model_reference_jet.py (every one off its default in JET, against the float64 NumPy
                       reference); test_pretrained_jet.py::test_logits_match_jet_nemotron (Jet-Nemotron's logits)
loop_steps, sandwich_norm_layers
                       test_model_reference_loop.py (both off their defaults in LOOP, against the float64 NumPy
                       reference); test_pretrained_ouro.py::test_logits_match_ouro (Ouro's logits at 3 loops and 1)
sleep_tol              test_model_sleep_depth.py::test_adaptive_depth_stops_where_the_tolerance_says (passes per
                       example = the float64 reference's stops at that tolerance)
dtype                  NEW test_bfloat16_changes_the_activations (test_model.py checks it stays close)
remat                  NEW test_remat_puts_checkpoints_in_the_program
gdn_backend            NEW test_backends_choose_the_kernels
attn_backend           NEW test_backends_choose_the_kernels
chunk_size             NEW test_chunk_size_sets_the_chunked_gdn_blocks
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
import sleepjax.step
import sleepjax.train
from helpers import numpy_reference as ref
from helpers.compare import case_key, rel_err
from helpers.runs import MICRO, finished_checkpoints
from sleepjax import optim, tasks
from sleepjax.evaluate import evaluate
from sleepjax.metrics_log import read_metrics
from sleepjax.train import (TrainConfig, init_train_state, learning_rates, load_run, loss_and_grads,
                            make_optimizer, train, train_step)

TASK = tasks.get("rule110", width=6, strings=2, t=1)
MODEL = sleepjax.ModelConfig(**MICRO, vocab_size=TASK.vocab_size, window=TASK.window, sleep_n=2)
# One step at the peak rate (no warmup, constant schedule), evaluated once at the end, no periodic checkpoint;
# seed and the held-out set away from their defaults. Each train() costs a few compiles: runs are shared.
ONE_STEP = dict(steps=1, batch_size=8, seed=5, adam_lr=1e-3, muon_lr=0.05, warmup_steps=0, lr_schedule="constant",
                eval_every=1000, eval_size=6, eval_batch_size=4, eval_seed=7, checkpoint_every=1000, log_every=1)


def run(workdir, **fields):
    """Trains MODEL on TASK with ONE_STEP overridden by ``fields``: (the final parameters, the results)."""
    results = train(TASK, MODEL, TrainConfig(**{**ONE_STEP, **fields}), workdir)
    return load_run(workdir)[0], results


def initial_params(seed=ONE_STEP["seed"]):
    return jax.jit(lambda: sleepjax.init(MODEL, jax.random.PRNGKey(seed)))()


def steps_taken(params):
    """Per leaf: (how far the run moved it from its initial value, whether Muon applies to it, that value)."""
    start = initial_params()
    hidden = jax.tree_util.tree_leaves(optim.hidden_matrix_labels(start))
    return [(np.asarray(a) - np.asarray(b), h, np.asarray(b)) for a, b, h in
            zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(start), hidden)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """ONE_STEP as it is (Muon + AdamW), watching what is evaluated."""
    workdir, seen = tmp_path_factory.mktemp("base"), []
    evaluate = sleepjax.train.evaluate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sleepjax.train, "evaluate",
                   lambda params, batches, **kw: seen.append(batches) or evaluate(params, batches, **kw))
        params, results = run(workdir)
    return dict(workdir=workdir, params=params, results=results, evaluated=seen)


# Three AdamW steps on a warmup + cosine schedule to a final fraction, with decay, clipping, micro-batches and a
# checkpoint every step of which two are kept, watching the micro-batch count the jitted step is traced with.
LONG = dict(steps=3, optimizer="adamw", adam_lr=1e-2, lr_schedule="cosine", warmup_steps=1, final_lr_fraction=0.5,
            weight_decay=0.1, grad_clip=0.5, grad_accum=2, checkpoint_every=1, keep_checkpoints=2)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    workdir, seen = tmp_path_factory.mktemp("long"), []
    original = sleepjax.step.loss_and_grads
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sleepjax.step, "loss_and_grads", lambda *a, grad_accum=1, **kw: seen.append(grad_accum) or
                   original(*a, grad_accum=grad_accum, **kw))
        sleepjax.train._jitted_step.cache_clear()  # traced afresh, under the watch
        params, results = run(workdir, **LONG)
    sleepjax.train._jitted_step.cache_clear()
    return dict(workdir=workdir, params=params, grad_accum=seen)


@pytest.mark.slow
def test_one_update_moves_each_parameter_by_its_optimizers_rate(tmp_path, base):
    """Adam's first step is lr * g / (|g| + eps): at most adam_lr per entry. Muon's orthogonalised step on the
    hidden matrices is far larger at muon_lr = 50 adam_lr. A zero first step would mean warmup or the cosine
    schedule's warmup (lr_schedule ignored)."""
    adamw = steps_taken(run(tmp_path / "adamw", optimizer="adamw")[0])
    assert max(np.abs(d).max() for d, _, _ in adamw) == pytest.approx(1e-3, rel=1e-2)
    muon = steps_taken(base["params"])
    # Muon's AdamW branch (optax.contrib.muon) uses Nesterov momentum: its first step is
    # lr * (b1 (1 - b1) / (1 - b1^2) + 1) = 1.4737 lr per entry at most (b1 = 0.9).
    nesterov_first = 0.9 * 0.1 / (1 - 0.9**2) + 1
    assert max(np.abs(d).max() for d, h, _ in muon if not h) == pytest.approx(1e-3 * nesterov_first, rel=1e-2)
    assert min(np.abs(d).max() for d, h, _ in muon if h) > 3e-3
    faster = steps_taken(run(tmp_path / "faster", muon_lr=0.1, adam_lr=3e-3)[0])
    for (d, hidden, _), (d2, _, _) in zip(muon, faster):
        np.testing.assert_allclose(d2, (2.0 if hidden else 3.0) * d, rtol=1e-3, atol=1e-7)


@pytest.mark.slow
def test_weight_decay_pulls_every_parameter_towards_zero(tmp_path, base):
    """Decoupled decay: the update gains -lr * weight_decay * p (muon_lr on hidden matrices, adam_lr elsewhere)."""
    decayed = steps_taken(run(tmp_path / "decay", weight_decay=0.5)[0])
    for (d, hidden, p0), (d0, _, _) in zip(decayed, steps_taken(base["params"])):
        np.testing.assert_allclose(d - d0, -(0.05 if hidden else 1e-3) * 0.5 * p0, rtol=1e-2, atol=2e-7)
    assert max(np.abs(p0).max() for _, _, p0 in decayed) > 0.1


@pytest.mark.slow
def test_grad_clip_scales_the_gradient_before_the_optimizer(tmp_path, base):
    """The gradient is scaled to global norm <= grad_clip before Adam and Muon see it: at 1e-30 it is far below
    their epsilon, so nothing moves (at the default 1.0 everything does)."""
    clipped = steps_taken(run(tmp_path / "clipped", grad_clip=1e-30)[0])
    assert max(np.abs(d).max() for d, _, _ in clipped) < 1e-12
    assert min(np.abs(d).max() for d, _, _ in steps_taken(base["params"])) > 1e-5


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_the_learning_rates_applied_are_the_schedule(kind):
    """Fed the same gradient every step, AdamW's update is -lr_t * g / (|g| + eps): the rates it applies, read
    back, are warmup (linear from 0 over warmup_steps), then cosine to final_lr_fraction x peak at ``steps`` (or
    constant), and that final rate after ``steps`` (an extended run). The logged rates are the same."""
    cfg = TrainConfig(steps=10, optimizer="adamw", adam_lr=0.5, warmup_steps=3, lr_schedule=kind,
                      final_lr_fraction=0.25, grad_clip=0.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    state, applied = tx.init(params), []
    for _ in range(14):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        applied.append(-float(updates["w"]))
    applied = np.asarray(applied)  # to float32 rounding of Adam's bias corrections (~1e-5)
    np.testing.assert_allclose(applied[:4], [0.0, 0.5 / 3, 1.0 / 3, 0.5], rtol=1e-4)
    if kind == "cosine":
        t = np.arange(3, 11)
        expected = 0.125 + 0.375 * 0.5 * (1 + np.cos(np.pi * (t - 3) / 7))
        np.testing.assert_allclose(applied[3:11], expected, rtol=1e-4)
        np.testing.assert_allclose(applied[10:], 0.125, rtol=1e-4)  # final_lr_fraction x peak, from step 10 on
    else:
        np.testing.assert_allclose(applied[3:], 0.5, rtol=1e-4)
    logged = learning_rates(cfg, cfg.steps)
    np.testing.assert_allclose([logged(t + 1)["adam_lr"] for t in range(14)], applied, rtol=1e-4)


@pytest.mark.slow
def test_train_runs_the_optimizer_of_its_config(long_run):
    """train() ends where the pure step, run with ``make_optimizer(cfg)``, ends on the same batches: what the
    schedule test above shows of make_optimizer holds for a run (a field dropped on its way to the jitted step
    would be at its default there: warmup 100, final fraction 0.1, no decay, one micro-batch)."""
    cfg = TrainConfig(**{**ONE_STEP, **LONG})
    tx = make_optimizer(cfg)
    state = jax.jit(lambda: init_train_state(MODEL, cfg, tx))()
    step = jax.jit(lambda s, b: train_step(s, b, tx=tx, sleep_schedule=TASK.sleep_schedule(MODEL.window),
                                           grad_accum=cfg.grad_accum))
    for i in range(cfg.steps):
        batch = TASK.batch(cfg.seed, i, cfg.batch_size)
        state, _ = step(state, {"tokens": batch["tokens"], "loss_mask": batch["loss_mask"]})
    for a, b in zip(jax.tree_util.tree_leaves(long_run["params"]), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_seed_draws_the_initial_parameters_and_the_batches(base):
    """The loss logged at step 1 is that of ``init(PRNGKey(seed))`` on the batch ``task.batch(seed, 0)``."""
    logged = read_metrics(base["workdir"] / "metrics.jsonl")[0]
    batch = TASK.batch(5, 0, ONE_STEP["batch_size"])
    metrics, _ = jax.jit(lambda p, t, m: loss_and_grads(p, t, m, schedule=TASK.sleep_schedule(MODEL.window)))(
        initial_params(5), batch["tokens"], batch["loss_mask"])
    assert logged["step"] == 1 and logged["loss"] == pytest.approx(float(metrics["loss"]), rel=1e-6)
    other = TASK.batch(0, 0, ONE_STEP["batch_size"])["tokens"]
    assert not np.array_equal(batch["tokens"], other), "seed 5 and the default seed must differ for this to test"


@pytest.mark.slow
def test_the_held_out_set_is_eval_size_items_of_eval_seed_in_eval_batch_size_batches(base):
    evaluated = base["evaluated"][-1]
    assert [len(b["tokens"]) for b in evaluated] == [4, 2]  # eval_size 6 in batches of 4
    expected = TASK.eval_set(7, 6, 4)
    for got, want in zip(evaluated, expected):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    assert not np.array_equal(expected[0]["tokens"], TASK.eval_set(10_000, 6, 4)[0]["tokens"])
    assert base["results"]["final_eval"]["items"] == 6 * TASK.num_items
    assert base["results"]["final_eval"] == evaluate(base["params"], expected, num_items=TASK.num_items,
                                                     difficulty_name=TASK.difficulty_name,
                                                     schedule=TASK.sleep_schedule(MODEL.window))


@pytest.mark.slow
def test_keep_checkpoints_keeps_only_the_newest(long_run):
    """A checkpoint every step, keep 2: the last two stay (every one kept would fill a pod's disk)."""
    assert sorted(finished_checkpoints(long_run["workdir"])) == [2, 3]


@pytest.mark.slow
def test_grad_accum_reaches_the_step(long_run):
    """The jitted step computes its gradient over grad_accum micro-batches (test_train_grad_accum.py shows what that
    computes; equal results would not show it was done, so the step is watched as it is traced)."""
    assert long_run["grad_accum"] and set(long_run["grad_accum"]) == {2}


# --- ModelConfig

EVERY_FIELD = dict(  # each away from its default
    vocab_size=13, d_model=16, layers=("gdn", "attn", "gdn"), attn_heads=4, attn_kv_heads=1, attn_head_dim=8,
    gdn_heads=1, gdn_value_heads=3, gdn_key_dim=8, gdn_value_dim=4, conv_size=3, mlp_dim=24, window=6, sleep_n=3,
    ssm_rule="hebbian", rope_theta=50.0, norm_eps=0.05, eviction="sliding", sleep_layers=(1, 3),
    attn_output_gate=True, qk_norm=True, rope_dim=4, norm_weight_offset=1.0, mlp_free_layers=(2,),
    tie_embeddings=True, remat="none", chunk_size=16)


def test_every_model_field_off_its_default_matches_the_reference():
    """All the fields that shape the mathematics at once, each away from its default, against the float64 NumPy
    reference, which reads each from the config: a field the model ignored would run at its default there."""
    cfg = sleepjax.ModelConfig(**EVERY_FIELD)
    defaults = sleepjax.ModelConfig()
    assert all(getattr(cfg, k) != getattr(defaults, k) for k in EVERY_FIELD if k != "chunk_size")
    params = sleepjax.init(cfg, case_key("every-field"))
    leaves, treedef = jax.tree_util.tree_flatten(params)  # every weight moved off its init (norms off one)
    keys = jax.random.split(case_key("every-field-perturb"), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [x + 0.3 * (float(jnp.std(x)) or 1.0) * jax.random.normal(
        k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    tokens = jax.random.randint(case_key("every-field-tokens"), (2, 22), 0, 13)
    mask = np.zeros((2, 22), bool)
    mask[1, 7:9] = True  # window 1 wakes in example 1 only; the others sleep
    logits = jax.jit(sleepjax.forward)(params, tokens, mask)
    expected, _ = ref.algorithm1(ref.Weights(params), tokens, mask)
    assert rel_err(logits, expected) <= 1e-4


def forward_program(**fields) -> str:
    cfg = MODEL.replace(**fields)
    params = sleepjax.init(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((2, 2 * cfg.window), jnp.int32)
    return str(jax.make_jaxpr(lambda p: sleepjax.forward(p, tokens, jnp.zeros(tokens.shape, bool)))(params))


def test_remat_puts_checkpoints_in_the_program():
    checkpoint = re.compile(r"= (remat2?|checkpoint)\[")  # jax.checkpoint's primitive
    assert checkpoint.search(forward_program(remat="pass", sleep_n=3))
    assert not checkpoint.search(forward_program(remat="none", sleep_n=3))


@pytest.mark.parametrize("field", ["gdn_backend", "attn_backend"])
def test_backends_choose_the_kernels(field):
    assert "pallas_call" in forward_program(**{field: "pallas"})
    assert "pallas_call" not in forward_program(**{field: "xla"})


def test_chunk_size_sets_the_chunked_gdn_blocks():
    """The chunked algorithm sums in chunk-sized blocks: another chunk size rounds differently (equal values)."""
    cfg = MODEL.replace(gdn_backend="chunked", window=64)
    params = sleepjax.init(cfg, jax.random.PRNGKey(1))
    tokens = jax.random.randint(case_key("chunk"), (2, 64), 0, cfg.vocab_size)
    out = {c: np.asarray(sleepjax.forward(params.replace(config=cfg.replace(chunk_size=c)), tokens,
                                          jnp.ones(tokens.shape, bool))) for c in (16, 32)}
    assert not np.array_equal(out[16], out[32]) and rel_err(out[16], out[32]) < 1e-4


def test_bfloat16_changes_the_activations():
    params = sleepjax.init(MODEL, jax.random.PRNGKey(2))
    tokens = jax.random.randint(case_key("bf16"), (2, 12), 0, MODEL.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    f32 = sleepjax.forward(params, tokens, mask)
    bf16 = sleepjax.forward(params.replace(config=MODEL.replace(dtype="bfloat16")), tokens, mask)
    assert 1e-4 < rel_err(bf16, f32) < 5e-2
