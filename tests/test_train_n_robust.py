"""N-robust training (TrainConfig.sleep_n_sample): each step's N drawn from a set as a pure function of (seed,
step), one compiled step for all of them, and every evaluation scoring each N of the set."""

import json

import numpy as np
import pytest

from helpers.runs import micro_setup
from sleepjax import train as train_lib
from sleepjax.train import TrainConfig, train


def test_the_sampled_n_is_a_pure_function_of_seed_and_step_over_the_whole_set():
    """Catches a draw that is not reproducible (resume would change N) or never reaches part of the set."""
    cfg = TrainConfig(sleep_n_sample="1:4", seed=3)
    draws = [cfg.sleep_passes_at(s) for s in range(200)]
    assert draws == [TrainConfig(sleep_n_sample="1:4", seed=3).sleep_passes_at(s) for s in range(200)]
    assert set(draws) == {1, 2, 3, 4}
    assert draws != [TrainConfig(sleep_n_sample="1:4", seed=4).sleep_passes_at(s) for s in range(200)]
    assert TrainConfig(sleep_n_sample="8,1,2").sleep_n_set == (1, 2, 8) and TrainConfig().sleep_n_set == ()
    for bad in ("0:3", "4:2", "a,b", "1;2"):
        with pytest.raises(ValueError, match="sleep_n_sample"):
            TrainConfig(sleep_n_sample=bad)


def test_n_robust_run_compiles_one_step_and_evaluates_every_n(tmp_path, monkeypatch):
    """Catches a sampled N that recompiles the step per value, a model whose sleep_n is not the set's largest,
    or an evaluation that skips the set's Ns (or scores them all at the trained N)."""
    steps = []
    original = train_lib._jitted_step

    def recording(*args):
        fn = original(*args)
        steps.append(fn)
        return fn

    monkeypatch.setattr(train_lib, "_jitted_step", recording)
    task, model_cfg, cfg = micro_setup(sleep_n=3, steps=6, eval_every=6, checkpoint_every=6, log_every=3,
                                       sleep_n_sample="1:3")
    results = train(task, model_cfg, cfg, tmp_path)
    assert {cfg.sleep_passes_at(s) for s in range(6)} == {1, 2, 3}  # the run met every N
    assert sum(fn._cache_size() for fn in set(steps)) == 1
    final = results["final_eval"]
    losses = [final[f"loss@N={n}"] for n in (1, 2, 3)]
    assert final["loss@N=3"] == final["loss"] and len(set(np.round(losses, 7))) == 3
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["slept_fraction"] == 1.0 for r in rows if r["kind"] == "train")
    with pytest.raises(ValueError, match="largest N"):
        train(task, model_cfg.replace(sleep_n=2), cfg, tmp_path / "other")


def test_a_launcher_sweep_names_n_robust_runs_by_their_set():
    """Catches an N-robust run filed and labelled as "N1" (the flag's default) and a --sweep_n that would train
    copies of the same N-robust model."""
    from experiments import common
    from experiments.configs import depo

    config = depo.get_config("tiny")
    config.train.sleep_n_sample = "1:4"
    try:
        common.FLAGS(["launcher", "--seeds=1,2"], known_only=True)
        runs = common.expand_runs(config)
        assert [(r.name, r.sleep_n) for r in runs] == [("Nrobust1-4_seed1", 4), ("Nrobust1-4_seed2", 4)]
        assert runs[0].label == "N-robust (N in 1,2,3,4 per step)"
        common.FLAGS(["launcher", "--seeds=1", "--sweep_n=1,4"], known_only=True)
        with pytest.raises(ValueError, match="drop --sweep_n"):
            common.expand_runs(config)
    finally:
        common.FLAGS.unparse_flags()
