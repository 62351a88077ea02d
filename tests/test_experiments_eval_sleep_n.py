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
