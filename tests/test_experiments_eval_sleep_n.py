"""``--eval_sleep_n`` scores a trained checkpoint at the N it is asked for: its figures equal a direct evaluation
of the same weights with that N (and differ between Ns), not the trained N's."""

import json

import numpy as np
import pytest

import sleepjax
from experiments import common
from helpers.runs import micro_setup
from sleepjax.train import load_run, train


def direct_loss(params, batches, n):
    """Mean supervised cross-entropy over the held-out batches with the model's N set to ``n``."""
    params = params.replace(config=params.config.replace(sleep_n=n))
    total = count = 0.0
    for batch in batches:
        value, metrics = sleepjax.loss(params, batch["tokens"], batch["loss_mask"])
        total += float(value) * float(metrics["supervised"])
        count += float(metrics["supervised"])
    return total / count


@pytest.mark.slow
def test_eval_sleep_n_scores_each_requested_n(tmp_path):
    """Catches an evaluation that ignores the requested N (scoring the trained N = 2 for every entry)."""
    task, model_cfg, train_cfg = micro_setup(sleep_n=2, steps=6, eval_every=6, checkpoint_every=6, log_every=3)
    train(task, model_cfg, train_cfg, tmp_path)
    result = common._evaluate_at_n(tmp_path, [1, 3])
    assert result["trained_n"] == 2 and json.loads((tmp_path / "eval_sleep_n.json").read_text()) == result
    params, _, cfg, task = load_run(tmp_path)
    batches = task.eval_set(cfg.eval_seed, cfg.eval_size, cfg.eval_batch_size)
    expected = {n: direct_loss(params, batches, n) for n in (1, 2, 3)}
    assert len({round(v, 6) for v in expected.values()}) == 3, "N must change the held-out loss in this case"
    for n in (1, 3):
        np.testing.assert_allclose(result["by_n"][str(n)]["loss"], expected[n], rtol=1e-5, err_msg=f"N = {n}")


@pytest.mark.slow
def test_eval_sleep_tol_scores_adaptive_depth(tmp_path):
    """Catches --eval_sleep_tol ignoring its tolerance or its maximum N: tol 0 runs every window to max N, an
    enormous tol stops every one after its first checked pass (2), and the file holds what was returned."""
    task, model_cfg, train_cfg = micro_setup(sleep_n=2, steps=6, eval_every=6, checkpoint_every=6, log_every=3)
    train(task, model_cfg, train_cfg, tmp_path)
    result = common._evaluate_at_tol(tmp_path, [0.0, 1e9], 3)
    assert json.loads((tmp_path / "eval_sleep_tol.json").read_text()) == result
    assert result["max_n"] == 3 and result["trained_n"] == 2
    assert result["by_tol"]["0.0"]["passes_mean"] == 3.0
    assert result["by_tol"]["1000000000.0"]["passes_mean"] == 2.0
    params, _, cfg, task = load_run(tmp_path)
    batches = task.eval_set(cfg.eval_seed, cfg.eval_size, cfg.eval_batch_size)
    np.testing.assert_allclose(result["by_tol"]["0.0"]["loss"], direct_loss(params, batches, 3), rtol=1e-5)


def test_eval_sleep_tol_flag_is_validated():
    """Catches a negative or non-numeric tolerance reaching the evaluation (after a whole training run)."""
    assert common._eval_tols(["0", "0.05"]) == [0.0, 0.05]
    assert common._eval_tols(None) == []
    for bad in (["-0.1"], ["x"], ["inf"]):
        with pytest.raises(ValueError, match="--eval_sleep_tol"):
            common._eval_tols(bad)
