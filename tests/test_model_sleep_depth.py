"""Sleep depth that is not one fixed N: a traced pass count (``sleep_passes``: one compiled program for every N up
to config.sleep_n, for N-robust training) and adaptive depth (``ModelConfig.sleep_tol``: an example stops sleeping
once a pass changes its fast weights by less than the tolerance, relative to the pass before).

References: the fixed-N model for each N, and the float64 NumPy reference (tests/helpers/numpy_reference.py) run
pass by pass, which decides the stops and gives finite-difference gradients for the passes taken.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers import numpy_reference as ref
from helpers.compare import case_key
from helpers.models import make_params
from sleepjax import model as model_lib

CONFIG = dict(layers=("attn", "gdn"), sleep_n=4)


def batch(tag, B=3, T=14):
    """window = 6: windows 0 and 1 sleep in every example, the last (short) window is supervised."""
    tokens = jax.random.randint(case_key(tag), (B, T), 0, 13)
    mask = np.zeros((B, T), bool)
    mask[:, 12:] = True
    return tokens, mask


def test_traced_pass_count_compiles_once_and_equals_each_fixed_n():
    """Catches a sleep_passes that recompiles per value, or is ignored (every value giving N = 4)."""
    params = make_params("depth-traced", **CONFIG)
    tokens, mask = batch("depth-traced-tokens")
    traces = []

    def loss_at(p, t, m, k):
        traces.append(1)
        return sleepjax.loss(p, t, m, sleep_passes=k)

    compiled = jax.jit(loss_at)
    values = []
    for k in (1, 2, 3, 4):
        value, metrics = compiled(params, tokens, mask, jnp.int32(k))
        fixed, _ = sleepjax.loss(params.replace(config=params.config.replace(sleep_n=k)), tokens, mask)
        np.testing.assert_allclose(float(value), float(fixed), rtol=1e-5, err_msg=f"N = {k}")
        assert float(metrics["slept"]) == float(metrics["should_sleep"]) == 6.0  # 3 examples x 2 windows
        values.append(float(value))
    assert len(traces) == 1
    assert len(set(values)) == 4


def reference_passes(w, tokens, mask, tol, n):
    """Per example and window: the passes adaptive depth takes (float64 reference), the relative changes seen,
    and the final logits [B, T, V] and states."""
    B, T = tokens.shape
    L = w.cfg.window
    states = ref.zero_states(w, B)
    taken, changes, logits = np.zeros((B, -(-T // L)), int), [], []
    for b in range(B):
        out = []
        for k, start in enumerate(range(0, T, L)):
            h0 = w.embed[np.asarray(tokens[b, start:start + L])]
            if mask[b, start:start + L].any():
                h, states[b], _ = ref.run_layers(w, h0, states[b], 0, len(w.runs))
                taken[b, k] = 1
            else:
                h, s, _ = ref.run_layers(w, h0, states[b], 0, len(w.runs))
                taken[b, k] = 1
                while taken[b, k] < n:
                    h, new, _ = ref.run_layers(w, h, s, 0, len(w.runs))
                    taken[b, k] += 1
                    change = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(new, s))
                                     / sum(np.sum(y ** 2) for y in s))
                    changes.append(change)
                    s = new
                    if change < tol:
                        break
                states[b] = s
            out.append(ref.logits_of(w, h))
        logits.append(np.concatenate(out))
    return taken, np.asarray(changes), np.stack(logits)


def test_adaptive_depth_stops_where_the_tolerance_says():
    """Catches a stopping rule that ignores sleep_tol, measures the change against the wrong state, or keeps
    changing an example after it stopped (its logits would differ from the reference's)."""
    params = make_params("depth-adaptive", **{**CONFIG, "sleep_n": 6})
    tokens, mask = batch("depth-adaptive-tokens", B=4)
    w = ref.Weights(params)
    _, changes, _ = reference_passes(w, np.asarray(tokens), mask, 0.0, 6)
    # a tolerance between two well-separated changes, so float32 and float64 agree on every stop
    ordered = np.sort(changes)
    gaps = ordered[1:] / ordered[:-1]
    i = int(np.argmax(gaps[len(gaps) // 4: 3 * len(gaps) // 4])) + len(gaps) // 4
    tol = float(np.sqrt(ordered[i] * ordered[i + 1]))
    assert gaps[i] > 1.05, "the case needs a clear gap between pass changes"
    taken, _, ref_logits = reference_passes(w, np.asarray(tokens), mask, tol, 6)
    assert len(set(taken[:, :2].ravel())) > 1, "examples must stop after different numbers of passes"
    adaptive = params.replace(config=params.config.replace(sleep_tol=tol))
    logits = sleepjax.forward(adaptive, tokens, mask)
    _, _, _, passes = model_lib.token_stats(adaptive, tokens, mask, return_passes=True)
    np.testing.assert_array_equal(np.asarray(passes), taken)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=2e-4 * np.abs(ref_logits).max())


def test_adaptive_depth_gradient_matches_finite_differences():
    """Catches a gradient through passes an example did not take (or cut at a stop): jax.grad of the adaptive
    model's loss against central differences of the float64 reference with the same passes."""
    params = make_params("depth-grad", **CONFIG)
    tokens, mask = batch("depth-grad-tokens", B=2)
    w = ref.Weights(params)
    _, changes, _ = reference_passes(w, np.asarray(tokens), mask, 0.0, 4)
    ordered = np.sort(changes)  # a tolerance between two separated changes: float32 and float64 stop alike
    i = len(ordered) // 2 + int(np.argmax(ordered[len(ordered) // 2:] / ordered[len(ordered) // 2 - 1:-1]))
    assert ordered[i] / ordered[i - 1] > 1.02, "the case needs a clear gap between pass changes"
    tol = float(np.sqrt(ordered[i - 1] * ordered[i]))
    taken, _, _ = reference_passes(w, np.asarray(tokens), mask, tol, 4)
    adaptive = params.replace(config=params.config.replace(sleep_tol=tol))
    _, _, _, passes = model_lib.token_stats(adaptive, tokens, mask, return_passes=True)
    np.testing.assert_array_equal(np.asarray(passes), taken)
    grads = jax.grad(lambda p: sleepjax.loss(p, tokens, mask)[0])(adaptive)
    direction = jax.tree_util.tree_map(lambda x: jax.random.normal(case_key("depth-dir", x.size), x.shape), params)

    def ref_loss(t):
        moved = jax.tree_util.tree_map(lambda p, d: np.asarray(p, np.float64) + t * np.asarray(d, np.float64),
                                       params, direction)
        # fixed passes: the ones adaptive depth took at the unmoved point
        fixed_w = ref.Weights(moved)
        logits = []
        states = ref.zero_states(fixed_w, tokens.shape[0])
        L = fixed_w.cfg.window
        for k, start in enumerate(range(0, tokens.shape[1], L)):
            out, states, _ = ref.run_window(fixed_w, np.asarray(tokens[:, start:start + L]), states, taken[:, k])
            logits.append(out)
        return ref.masked_loss(np.concatenate(logits, axis=1), tokens, mask)

    eps = 1e-4
    fd = (ref_loss(eps) - ref_loss(-eps)) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                         jax.tree_util.tree_leaves(direction)))
    assert abs(analytic - fd) <= 2e-3 * abs(fd), (analytic, fd)


def test_sleep_tol_is_validated():
    with pytest.raises(ValueError, match="sleep_tol"):
        sleepjax.ModelConfig(sleep_tol=-1.0)


def test_evaluation_reports_the_passes_each_window_took():
    """Catches a pass histogram that counts supervised windows, reads the wrong passes, or an adaptive evaluation
    that drops the tolerance or the maximum N (every window would sit at N, or at the trained N)."""
    from sleepjax.evaluate import evaluate_at_sleep_tol

    params = make_params("depth-histogram", **{**CONFIG, "sleep_n": 6})
    tokens, mask = batch("depth-histogram-tokens", B=4)
    item = np.full(mask.shape, -1, np.int32)
    item[:, 12] = 0
    batches = [{"tokens": tokens, "loss_mask": mask, "item": item, "difficulty": np.zeros((4, 1), np.int32)}]
    w = ref.Weights(params)
    _, changes, _ = reference_passes(w, np.asarray(tokens), mask, 0.0, 6)
    ordered = np.sort(changes)
    # tolerances between two separated changes (float32 and float64 stop alike); the first that splits the windows
    for i in np.argsort(-ordered[1:] / ordered[:-1]):
        tol = float(np.sqrt(ordered[i] * ordered[i + 1]))
        taken, _, _ = reference_passes(w, np.asarray(tokens), mask, tol, 6)
        sleeping = taken[:, :2].ravel()  # windows 0 and 1 sleep, the last is supervised
        if len(set(sleeping)) > 1:
            break
    assert ordered[i + 1] / ordered[i] > 1.02, "the case needs a clear gap between pass changes"
    expected = {p: float(np.mean(sleeping == p)) for p in range(1, 7)}
    assert 0 < max(expected.values()) < 1, "the tolerance must split the windows"
    # the model is built at N = 2 and evaluated at up to 6 passes: max_n must reach the model
    small = params.replace(config=params.config.replace(sleep_n=2))
    results = evaluate_at_sleep_tol(small, batches, [0.0, tol, 1e9], 6, num_items=1)
    assert results[0.0]["passes_mean"] == 6.0 and results[0.0]["passes_hist/6"] == 1.0
    assert results[1e9]["passes_mean"] == 2.0 and results[1e9]["passes_hist/2"] == 1.0  # the first check stops it
    got = results[tol]
    np.testing.assert_allclose([got[f"passes_hist/{p}"] for p in range(1, 7)], list(expected.values()))
    assert got["passes_mean"] == pytest.approx(float(np.mean(sleeping)))
