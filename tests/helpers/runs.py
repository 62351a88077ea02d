"""Training runs in tests: the micro model and its rule110 setup, checkpoints, metrics, interrupted children."""

import time
from pathlib import Path

import jax
import numpy as np

import sleepjax
from sleepjax import tasks
from sleepjax.metrics_log import read_metrics
from sleepjax.train import TrainConfig, load_run

# A micro model (one attention and one GDN layer, d = 16): trains a few rule110 steps in seconds.
MICRO = dict(d_model=16, layers=("attn", "gdn"), attn_heads=1, attn_kv_heads=1, attn_head_dim=8, gdn_heads=1,
             gdn_value_heads=1, gdn_key_dim=8, gdn_value_dim=8, mlp_dim=32, chunk_size=16)


def micro_setup(sleep_n=2, **train):
    """(task, ModelConfig, TrainConfig) of a 40-step rule110 run of the MICRO model; ``train`` overrides fields."""
    task = tasks.get("rule110", width=6, strings=2, t=1)
    model_cfg = sleepjax.ModelConfig(**MICRO, vocab_size=task.vocab_size, window=task.window, sleep_n=sleep_n)
    train_cfg = TrainConfig(**{**dict(steps=40, batch_size=16, muon_lr=0.02, adam_lr=3e-3, warmup_steps=5,
                                      eval_every=20, eval_size=32, eval_batch_size=16, checkpoint_every=20,
                                      log_every=5), **train})
    return task, model_cfg, train_cfg


def finished_checkpoints(workdir) -> list[int]:
    """Steps of the checkpoints orbax has finished in ``workdir``: it saves asynchronously into a temporary folder
    and renames it to the step number only once every process has written its part."""
    folder = Path(workdir) / "checkpoints"
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []


TIMING_FIELDS = ("steps_per_s", "tokens_per_s", "elapsed_s")


def without_timing(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without the wall-clock fields: what two runs of the same training must agree on, bitwise."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def checkpoint_params(workdir, step=None) -> list:
    """The parameter leaves (NumPy) of a run's checkpoint (latest by default)."""
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(load_run(workdir, step)[0])]


def damage_checkpoint(workdir, step: int, how: str = "data") -> None:
    """Damages checkpoint ``step`` as storage does: ``data`` overwrites every data file with garbage of the same
    size; ``metadata`` deletes the tree metadata orbax reads first."""
    folder = Path(workdir) / "checkpoints" / str(step)
    assert folder.is_dir(), f"no checkpoint {step} in {workdir}"
    if how == "data":
        files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files, f"no data files under {folder}"
        rng = np.random.default_rng(step)
        for p in files:
            p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    elif how == "metadata":
        (folder / "default" / "_METADATA").unlink()
    else:
        raise ValueError(f"how must be 'data' or 'metadata', got {how!r}")


def wait_for_step(procs, workdir, step, past_a_checkpoint=False, timeout=300):
    """Until the children's log reaches ``step`` (read defensively: a child may be mid-append), and with
    ``past_a_checkpoint`` until training has moved past a finished checkpoint; fails if a child ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(Path(workdir) / "metrics.jsonl")
        last = rows[-1]["step"] if rows else 0
        if last >= step and (not past_a_checkpoint or last > max(finished_checkpoints(workdir), default=1e9)):
            return
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, "the run ended before it could be interrupted\n" + str(ended[0].communicate()[0])[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach step {step} in {timeout} s")
