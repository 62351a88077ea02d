"""Algorithm 1 per example (issue 17): an example's window sleeps iff none of ITS positions there is supervised,
so its logits, loss terms and gradients never depend on the batch it shares; the sleep schedule
(``sleepjax/schedule.py``) changes what a compiled call costs, never what it computes; a step runs the passes its
schedule says, with no data-dependent branch; and what slept is counted and reported."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import assert_trees_close, case_key, rel_err
from helpers.models import make_params
from sleepjax import model as model_lib
from sleepjax import schedule as schedule_lib

B, T = 4, 22  # windows of 6, 6, 6 and a short last one of 4
SLOW = pytest.mark.slow  # cases the default run skips (python -m pytest -m slow runs them)


def mixed_layouts():
    """Four examples whose windows do not line up: ex 0 is supervised in window 1 only, ex 1 in windows 0 and 3,
    ex 2 in the short last window only, ex 3 in every window: each window is supervised by some examples and not
    by others (schedule MMMM)."""
    m = np.zeros((B, T), bool)
    m[0, 7:9] = True
    m[1, 2] = True
    m[1, 19] = True
    m[2, 20] = True
    m[3, [1, 8, 14, 20]] = True
    return m


def row_loss(params, tokens, mask, b, **kwargs):
    """Example b's loss term: its summed cross-entropy over its own supervised positions."""
    ce, _, m = model_lib.token_stats(params, tokens, mask, **kwargs)
    return (ce[b] * m[b]).sum()


@pytest.mark.parametrize("eviction,sleep_layers", [pytest.param("hard", None, marks=SLOW),
                                                   pytest.param("sliding", None, marks=SLOW),
                                                   ("hard", (1, 3)), ("sliding", (1, 4))])
def test_an_example_gets_the_same_outputs_whatever_batch_it_shares(eviction, sleep_layers):
    """Each example's logits in a batch of mixed layouts equal the float64 per-example reference and its logits
    when run alone (eager: schedule derived; jit: M everywhere); its loss term's gradient equals the one it gets
    alone. Catches the decision taken over the batch (the old ``any`` over [B, L]), over the wrong axis, the
    per-example select applied to pass 0 or not at all, and a woken example's fast weights taken from a later pass."""
    params = make_params(("batch", eviction, sleep_layers), sleep_n=3, eviction=eviction, sleep_layers=sleep_layers)
    tokens = jax.random.randint(case_key("batch-tokens", eviction), (B, T), 0, 13)
    mask = mixed_layouts()
    assert schedule_lib.derive(mask, 6) == "MMMM"
    expected, _ = ref.algorithm1(ref.Weights(params), tokens, mask)
    in_batch = sleepjax.forward(params, tokens, mask)
    forward = jax.jit(sleepjax.forward)
    in_batch_jit = forward(params, tokens, mask)
    for b in range(B):
        alone = forward(params, tokens[b:b + 1], mask[b:b + 1])
        assert rel_err(alone[0], expected[b]) < 1e-4, f"example {b} alone vs reference"
        assert rel_err(in_batch[b], expected[b]) < 1e-4, f"example {b} in the batch vs reference"
        assert rel_err(in_batch[b], alone[0]) < 1e-5, f"example {b}: batch vs alone"
        assert rel_err(in_batch_jit[b], alone[0]) < 1e-5, f"example {b}: batch (jit, M) vs alone"
    grad = jax.jit(jax.grad(row_loss))  # b traced: one compile per batch shape
    for b in (0, 2):  # one example that sleeps in the first window and one that wakes there
        g_batch = grad(params, tokens, mask, b)
        g_alone = grad(params, tokens[b:b + 1], mask[b:b + 1], 0)
        assert_trees_close(g_batch, g_alone, 1e-4, f"example {b}: gradient of its loss term")


def test_the_schedule_changes_the_cost_not_the_result():
    """A batch whose layout fixes its windows (S W W) gives the same logits under its derived schedule, under M
    everywhere, and with one window widened to M; a schedule that does not fit a concrete mask raises, naming the
    window and example (catches a wrong schedule silently sleeping a supervised window)."""
    params = make_params("schedules", sleep_n=4, sleep_layers=(1, 4))
    tokens = jax.random.randint(case_key("sched-tokens"), (3, 18), 0, 13)
    mask = np.zeros((3, 18), bool)
    mask[:, 7] = True
    mask[:, 13:17] = True
    assert schedule_lib.derive(mask, 6) == "SWW"
    base = sleepjax.forward(params, tokens, mask, schedule="SWW")
    for schedule in ("MMM", "MWW", "SMW", "SWM"):
        out = jax.jit(lambda p, t, m: sleepjax.forward(p, t, m, schedule=schedule))(params, tokens, mask)
        assert rel_err(out, base) < 1e-5, schedule
    asleep = sleepjax.forward(params, tokens, np.zeros_like(mask), schedule="SSS")
    assert rel_err(asleep[:, :6], base[:, :6]) < 1e-5  # window 0 slept in both
    assert rel_err(asleep[:, 6:], base[:, 6:]) > 1e-2  # windows 1, 2 slept vs woke
    with pytest.raises(ValueError, match="window 1 is declared S .* example 0 is supervised"):
        sleepjax.forward(params, tokens, mask, schedule="SSW")
    with pytest.raises(ValueError, match="window 0 is declared W .* example 0 is not supervised"):
        sleepjax.loss(params, tokens, mask, schedule="WWW")
    with pytest.raises(ValueError, match="schedule must be a string of 3 letters"):
        sleepjax.forward(params, tokens, mask, schedule="SW")


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _matmul_flops(jaxpr, times=1) -> float:
    """2 M N K of every dot_general, times the lengths of the scans around it: the work a call does (XLA's own
    cost analysis counts a loop body once, whatever its trip count)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), (batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            k = np.prod([lhs[d] for d in contract])
            total += times * 2.0 * np.prod(lhs) * np.prod(rhs) / k / np.prod([lhs[d] for d in batch])
        inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _matmul_flops(sub, inner)
    return total


def _flops(params, tokens, mask, schedule):
    return _matmul_flops(jax.make_jaxpr(
        lambda p: model_lib.token_stats(p, tokens, mask, schedule=schedule)[0].sum())(params).jaxpr)


def test_a_step_runs_the_passes_its_schedule_says():
    """The traced cost follows the schedule: an S window costs N passes and a W window one (the forward's matmul
    flops at N = 4 over N = 1 are within 10% of ``layer_passes``'s ratio), an M window costs N passes, and the
    traced step has no ``cond`` (no data-dependent branch over passes) under S/W schedules. Catches sleep passes
    run in wake windows, the passes skipped in sleep windows, and a batch-wide branch brought back."""
    p1 = make_params("cost", sleep_n=1, window=16, d_model=64, mlp_dim=256)
    p4 = p1.replace(config=p1.config.replace(sleep_n=4))
    tokens = jax.random.randint(case_key("cost-tokens"), (2, 64), 0, 13)
    mask = np.zeros((2, 64), bool)
    mask[:, 48:63] = True  # windows 0-2 sleep, window 3 wakes
    schedule = schedule_lib.derive(mask, 16)
    assert schedule == "SSSW"
    ratio = _flops(p4, tokens, mask, schedule) / _flops(p1, tokens, mask, schedule)
    expected = model_lib.layer_passes(p4.config, mask) / model_lib.layer_passes(p1.config, mask)
    assert expected == (3 * 4 * 4 + 4) / (4 * 4)
    assert abs(ratio / expected - 1) < 0.1, (ratio, expected)
    mixed = _flops(p4, tokens, mask, "MMMM") / _flops(p4, tokens, mask, schedule)
    assert abs(mixed - 16 / 13) < 0.1 * 16 / 13, mixed  # every window at N passes
    jaxpr = jax.make_jaxpr(lambda p: jax.grad(lambda q: sleepjax.loss(q, tokens, mask, schedule=schedule)[0])(p))(p4)
    assert "cond" not in _primitives(jaxpr.jaxpr)


def test_passes_and_sleep_counts_report_what_ran():
    """``token_stats(return_passes=True)`` gives N for each example-window with no supervision and 1 elsewhere;
    ``sleep_counts`` then reports slept == should_sleep. A schedule that does not fit (given under jit, where the
    mask cannot be checked) shows in the counts: W over an unsupervised window lowers ``slept``, S over a
    supervised one raises ``slept_supervised``. Catches counts computed from the schedule instead of what ran."""
    params = make_params("counts", sleep_n=3)
    tokens = jax.random.randint(case_key("counts-tokens"), (B, T), 0, 13)
    mask = mixed_layouts()
    stats = jax.jit(lambda p, t, m, s=None: model_lib.token_stats(p, t, m, schedule=s, return_passes=True),
                    static_argnums=3)
    passes = np.asarray(stats(params, tokens, mask)[3])
    supervised = np.pad(mask, ((0, 0), (0, 2))).reshape(B, 4, 6).any(axis=2)
    np.testing.assert_array_equal(passes, np.where(supervised, 1, 3))
    counts = {k: int(v) for k, v in model_lib.sleep_counts(params.config, mask, passes).items()}
    assert counts == {"should_sleep": int((~supervised).sum()), "slept": int((~supervised).sum()),
                      "slept_supervised": 0}
    wrong = model_lib.sleep_counts(params.config, mask, stats(params, tokens, mask, "WWWW")[3])
    assert int(wrong["slept"]) == 0 and model_lib.slept_fraction(wrong) == 0.0
    wrong = model_lib.sleep_counts(params.config, mask, stats(params, tokens, mask, "SSSS")[3])
    assert int(wrong["slept_supervised"]) == int(supervised.sum())
    _, metrics = sleepjax.loss(params, tokens, mask)
    assert int(metrics["slept"]) == int(metrics["should_sleep"]) == int((~supervised).sum())
