"""python -m experiments.generate end to end: a Hugging Face checkpoint (the tiny Qwen3 fixture with its
tokenizer.json) or a training run's directory, prompts from flags and a JSONL file, JSONL out, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import sleepjax
from sleepjax import pretrained

REPO = Path(__file__).resolve().parents[1]
QWEN3 = REPO / "tests" / "fixtures" / "qwen3"


def launch(env, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO,
                          env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=timeout)


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_generate_from_a_hugging_face_checkpoint(launcher_env, tmp_path):
    # Catches: prompts lost or reordered between the flags and the file, ids that are not the tokenizer's, a
    # launcher whose tokens differ from sleepjax.generate's (greedy, and sampling with the seed's key).
    prompts_file = tmp_path / "prompts.jsonl"
    long_prompt = "a longer prompt, from the file; with the new tokens it crosses the window"
    prompts_file.write_text(json.dumps({"prompt": long_prompt}) + "\n\n")
    outputs = {}
    for name, extra in (("greedy", []), ("sampled", ["--temperature=8", "--top_k=20", "--seed=3"])):
        out = launch(launcher_env, f"--init_from={QWEN3}", "--prompt=hello world", "--prompt=the cat",
                     f"--prompts_file={prompts_file}", "--max_new_tokens=70", "--sleep_n=2", "--batch_size=2",
                     f"--output={tmp_path / name}.jsonl", *extra)
        assert out.returncode == 0, out.stderr[-3000:]
        outputs[name] = rows_of(tmp_path / f"{name}.jsonl")
    tokenizer = pretrained.load_tokenizer(QWEN3)
    params = pretrained.load(QWEN3, sleep_n=2)
    prompts = ["hello world", "the cat", json.loads(prompts_file.read_text().splitlines()[0])["prompt"]]
    for name, rows in outputs.items():
        assert [r["prompt"] for r in rows] == prompts
        ids = [r["prompt_ids"] for r in rows]
        assert ids == [tokenizer.encode(p).ids for p in prompts]
        for start in (0, 2):  # the launcher's batches of 2, each with the key fold_in(PRNGKey(seed), start)
            kwargs = dict(temperature=8.0, top_k=20, key=jax.random.fold_in(jax.random.PRNGKey(3), start)) if (
                name == "sampled") else {}
            expected = sleepjax.generate(params, ids[start:start + 2], 70, **kwargs).sequences()
            assert [r["completion_ids"] for r in rows[start:start + 2]] == expected
        for r in rows:
            assert r["completion"] == tokenizer.decode(r["completion_ids"]) and not r["stopped_at_eos"]
    assert outputs["sampled"][0]["completion_ids"] != outputs["greedy"][0]["completion_ids"]


def test_errors_are_one_line(launcher_env, tmp_path):
    # Catches: a traceback or a usage dump instead of one line naming what is wrong, a success exit code.
    bad_file = tmp_path / "bad.jsonl"
    bad_file.write_text('{"text": "no prompt field"}\n')
    cases = [(["--init_from=/no/such/dir", "--prompt=x"], "no such directory"),
             ([f"--run_dir={tmp_path}", "--prompt=x"], "not a training run directory"),
             (["--max_new_tokens=0"], "max_new_tokens"),
             (["--no_such_flag=1"], "no_such_flag"),
             ([f"--init_from={QWEN3}"], "no prompts"),
             ([f"--init_from={QWEN3}", f"--prompts_file={bad_file}"], "prompt"),
             ([f"--init_from={QWEN3}", f"--run_dir={tmp_path}", "--prompt=x"], "exactly one")]
    for args, match in cases:
        out = launch(launcher_env, *args, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and match in lines[0], (args, out.stderr[-2000:])
    help_out = launch(launcher_env, "--help", timeout=120)
    assert help_out.returncode == 0 and "--max_new_tokens" in help_out.stdout and "--prompts_file" in help_out.stdout


@pytest.mark.slow
def test_generate_from_a_training_run(launcher_env, tmp_path):
    # Catches: a run directory whose checkpoint, model settings or task vocabulary the launcher does not restore.
    workdir = tmp_path / "depo"
    train = subprocess.run([sys.executable, "-m", "experiments.depo", f"--workdir={workdir}", "--sleep_n=2",
                            "--config.train.steps=2", "--config.train.batch_size=4", "--config.train.eval_size=4",
                            "--config.train.eval_every=2", "--config.train.checkpoint_every=2",
                            "--config.model.d_model=16", "--config.model.mlp_dim=32"], cwd=REPO,
                           env={**launcher_env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    out = launch(launcher_env, f"--run_dir={workdir}", "--prompt=HOP1 e3 ANS", "--prompt=SEP e1 e2 SEP HOP2 e1 ANS",
                 "--max_new_tokens=30", f"--output={tmp_path / 'out.jsonl'}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = rows_of(tmp_path / "out.jsonl")
    from sleepjax.train import load_run

    params, _, _, task = load_run(workdir)
    assert params.config.sleep_n == 2 and params.config.window == task.window
    assert [r["prompt_ids"] for r in rows] == [task.encode(r["prompt"].split()).tolist() for r in rows]
    expected = sleepjax.generate(params, [r["prompt_ids"] for r in rows], 30).sequences()
    assert [r["completion_ids"] for r in rows] == expected
    assert [r["completion"] for r in rows] == [task.decode(ids) for ids in expected]
    bad = launch(launcher_env, f"--run_dir={workdir}", "--prompt=HOP1 notaword", timeout=300)
    assert bad.returncode == 1 and "notaword" in bad.stderr and "Traceback" not in bad.stderr
