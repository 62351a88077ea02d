"""TrainConfig.eval_mode="generate": every evaluation of a training run also scores the answers the model writes
itself (free greedy generation), beside the teacher-forced exact accuracy."""

import json

import pytest

from helpers.runs import micro_setup
from sleepjax.train import train


@pytest.mark.slow
def test_generate_eval_mode_logs_generated_accuracy(tmp_path):
    """Catches eval_mode ignored by the trainer (no exact_generated in the eval rows and results). The item-by-item
    agreement of generated and teacher-forced answers is tested in test_generate.py; here they must agree on
    average (under "unsupervised" the same windows sleep)."""
    task, model_cfg, cfg = micro_setup(sleep_n=2, steps=4, eval_every=2, checkpoint_every=4, log_every=2,
                                       eval_size=16, eval_mode="generate", eval_generation_sleep="unsupervised")
    results = train(task, model_cfg, cfg, tmp_path)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for row in evals + [results["final_eval"]]:
        assert row["exact_generated"] == row["exact"]  # same windows sleep: agree item by item, so on average
    _, _, plain = micro_setup(sleep_n=2, steps=4, eval_every=2, checkpoint_every=4, log_every=2, eval_size=16)
    assert "exact_generated" not in train(task, model_cfg, plain, tmp_path / "plain")["final_eval"]
