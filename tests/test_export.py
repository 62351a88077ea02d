"""Export: ``pretrained.save`` records the sleep settings (restored by ``load``), keeps the source checkpoint's
max_position_embeddings, tokenizer and generation config, writes bfloat16 and sharded safetensors; ``export_run``
turns a trained run directory into such a directory; transformers loads it to the same logits (with a Python that
has torch + transformers, named by SLEEPJAX_HF_PYTHON)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sleepjax
from helpers.compare import assert_trees_close
from sleepjax import export, pretrained, tasks
from sleepjax.train import TrainConfig, load_run, train

FIXTURES = Path(__file__).parent / "fixtures"
QWEN3 = FIXTURES / "qwen3"
CHECK_SCRIPT = FIXTURES / "check_export_transformers.py"
SLEEP = dict(window=8, sleep_n=3, sleep_layers=(1, 3), eviction="sliding")


def sleep_settings(cfg):
    return {k: getattr(cfg, k) for k in pretrained.SLEEP_FIELDS}


@pytest.mark.parametrize("name,insert", [("qwen3", 0), ("qwen3_5_text", 0), ("qwen3", 2)])
def test_save_load_restores_the_sleep_settings(name, insert, tmp_path):
    """Catches the original bug: a reloaded fine-tune silently ran without sleep (N = 1, the checkpoint's
    max_position_embeddings as window, no sleep_layers, hard eviction); also that runtime fields are not baked in."""
    params = pretrained.load(FIXTURES / name, insert_gdn=insert, **SLEEP, ssm_rule="hebbian", dtype="bfloat16",
                             remat="both")
    family = pretrained.save(params, tmp_path)
    assert family == ("sleepjax" if insert else name)
    again = pretrained.load(tmp_path)
    assert sleep_settings(again.config) == SLEEP and again.config.ssm_rule == "hebbian"
    runtime = {k: getattr(sleepjax.ModelConfig(), k) for k in pretrained.RUNTIME_FIELDS}
    assert again.config == params.config.replace(**runtime)
    assert_trees_close(again.replace(config=params.config), params, 0.0, "reloaded")
    assert pretrained.load(tmp_path, sleep_n=1, window=16).config.sleep_n == 1  # overrides still win


def test_max_position_embeddings_stays_the_checkpoints(tmp_path):
    """Catches writing the training window as max_position_embeddings (transformers would then refuse or mis-rope
    longer inputs), and losing it over a second save or from a Qwen3.5 ConditionalGeneration's text_config."""
    params = pretrained.load(QWEN3, window=8)
    pretrained.save(params, tmp_path / "a", source=QWEN3)
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["max_position_embeddings"] == 64 and written["sleepjax"]["model_config"]["window"] == 8
    assert written["use_sliding_window"] is False  # the rest of the source's Qwen3 config is kept
    again = pretrained.load(tmp_path / "a")
    assert again.config.window == 8
    pretrained.save(again, tmp_path / "b", source=tmp_path / "a")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["max_position_embeddings"] == 64
    vl = pretrained.load(FIXTURES / "qwen3_5_vl", window=8)
    assert pretrained.save(vl, tmp_path / "c", source=FIXTURES / "qwen3_5_vl") == "qwen3_5_text"
    assert json.loads((tmp_path / "c" / "config.json").read_text())["max_position_embeddings"] == 64
    pretrained.save(params, tmp_path / "d")  # no source: a model trained from scratch has seen window positions
    assert json.loads((tmp_path / "d" / "config.json").read_text())["max_position_embeddings"] == 8


def test_source_tokenizer_and_generation_config_are_copied(tmp_path):
    """Catches an export transformers/users cannot tokenize with (no tokenizer or generation config copied)."""
    source = tmp_path / "src"
    source.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        (source / f).write_bytes((QWEN3 / f).read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (source / "chat_template.jinja").write_text("{{ messages }}")
    pretrained.save(pretrained.load(source), tmp_path / "out", source=source)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (source / f).read_bytes(), f
    assert pretrained.load_tokenizer(tmp_path / "out").encode("Answer: 12").ids


def test_bfloat16_export_halves_the_file_and_loads_back(tmp_path):
    """Catches a bf16 option that writes float32 anyway (no saving) or mangles values (beyond bf16 rounding)."""
    params = pretrained.load(FIXTURES / "qwen3_5_text")
    pretrained.save(params, tmp_path / "f32")
    pretrained.save(params, tmp_path / "bf16", dtype="bfloat16")
    f32, bf16 = (os.path.getsize(tmp_path / d / "model.safetensors") for d in ("f32", "bf16"))
    assert 0.45 < bf16 / f32 < 0.55, (bf16, f32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = pretrained.load(tmp_path / "bf16")
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float32
        np.testing.assert_array_less(np.abs(a - b), np.abs(b) * 2.0**-8 + 1e-30)
    with pytest.raises(ValueError, match="dtype must be one of"):
        pretrained.save(params, tmp_path / "x", dtype="float16")


def test_sharded_save_writes_an_index_and_loads_back_exactly(tmp_path):
    """Catches a shard missing from the index, a tensor split across files, and stale shards of an earlier save
    shadowing a later single-file one."""
    params = pretrained.load(QWEN3)
    pretrained.save(params, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / pretrained.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.glob("model-*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(params))
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(tmp_path / shard), framework="numpy") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, (shard, sizes)
    assert_trees_close(pretrained.load(tmp_path), params, 0.0, "sharded")
    pretrained.save(params, tmp_path)  # unsharded again: the shards and the index go
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / pretrained.INDEX_FILE).exists()
    assert_trees_close(pretrained.load(tmp_path), params, 0.0, "single file")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Two fine-tuning steps of the tiny Qwen3 fixture with sleep (N = 2, sleep_layers, sliding eviction)."""
    workdir = tmp_path_factory.mktemp("export_run")
    task = tasks.get("rule110", width=6, strings=2, t=1)  # 4 token ids: inside the checkpoint's vocabulary
    model_cfg = pretrained.load_config(QWEN3, window=task.window, sleep_n=2, sleep_layers=(1, 3), eviction="sliding")
    cfg = TrainConfig(steps=2, batch_size=8, muon_lr=0.02, adam_lr=3e-3, warmup_steps=1, eval_every=2, eval_size=8,
                      eval_batch_size=8, checkpoint_every=2, log_every=1, init_from=str(QWEN3))
    train(task, model_cfg, cfg, workdir, log_enabled=False)
    return workdir


def test_export_run_writes_what_load_reads(trained_run, tmp_path):
    """Catches an export of the wrong weights (not the run's checkpoint), lost sleep settings, a missing tokenizer,
    and a command line that does not work."""
    params, model_cfg, _, _ = load_run(trained_run)
    result = export.export_run(trained_run, tmp_path / "out")
    assert result["family"] == "qwen3" and result["step"] == 2 and result["source"] == str(QWEN3)
    again = pretrained.load(tmp_path / "out")
    assert sleep_settings(again.config) == sleep_settings(model_cfg) == dict(
        window=model_cfg.window, sleep_n=2, sleep_layers=(1, 3), eviction="sliding")
    assert_trees_close(again.replace(config=params.config), params, 0.0, "exported")
    assert float(jnp.abs(params.layers[0]["wq"] - pretrained.load(QWEN3).layers[0]["wq"]).max()) > 0  # trained
    for f in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (QWEN3 / f).read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["sleepjax"]["provenance"]["step"] == 2
    # the command line: bf16, one line on error
    assert export.main([str(trained_run), str(tmp_path / "bf16"), "--dtype=bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    out = subprocess.run([sys.executable, "-m", "sleepjax.export", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "is not a run directory" in out.stderr
    assert export.main([str(trained_run), str(tmp_path / "y"), "--step=1"]) == 1  # no checkpoint at step 1


def _hf_python():
    python = os.environ.get("SLEEPJAX_HF_PYTHON")
    if not python:
        pytest.skip("set SLEEPJAX_HF_PYTHON to a Python with torch + transformers to check exports against "
                    "transformers (e.g. SLEEPJAX_HF_PYTHON=/work/benchvenv/bin/python)")
    return python


@pytest.mark.parametrize("which", ["trained_qwen3", "qwen3_5_text"])
def test_transformers_loads_the_export_with_the_same_logits(which, tmp_path, request):
    """Catches an export transformers cannot load or reads differently (a renamed/transposed tensor, a wrong config
    key, a lost tie, bad RoPE settings): at N = 1 with one window (no eviction) sleepjax is the plain model."""
    python = _hf_python()
    out = tmp_path / "export"
    if which == "trained_qwen3":
        export.export_run(request.getfixturevalue("trained_run"), out)
    else:
        pretrained.save(pretrained.load(FIXTURES / which), out, source=FIXTURES / which)
    tokens = np.load(FIXTURES / "qwen3" / "golden.npz")["tokens"]
    params = pretrained.load(out, window=tokens.shape[1], sleep_n=1, sleep_layers=None, eviction="hard")
    logits = sleepjax.forward(params, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))
    np.savez(tmp_path / "sleepjax_logits.npz", tokens=tokens, logits=np.asarray(logits, np.float32))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
    run = subprocess.run([python, str(CHECK_SCRIPT), str(out), str(tmp_path / "sleepjax_logits.npz")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # cwd outside the repo
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-1])  # "OK: <class> rel err ...; torch ..., transformers ..." (pytest -rP)
