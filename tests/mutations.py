"""Mutation check (not part of the default test run): do the tests catch the bugs that matter?

Each entry below is one deliberate single-line bug (an exact string replacement in one file) and the test files
that must catch it. The check copies the working tree to a temporary directory, plants one bug at a time there,
runs ``python -m pytest -x -q -m ''`` on the named files inside the copy (``-m ''``: the tests marked slow too,
which the default run skips), and counts the bug as caught when pytest fails (a timeout counts as not caught). A
target text that is not found exactly once fails the whole check before anything runs (update the entry when the
code it aims at moves). The named files are first run once on the unmutated copy: a bug only counts as caught if
those files pass without it.

    python tests/mutations.py                    # every mutation (long: tens of minutes on 2 cores)
    python tests/mutations.py --list             # the catalogue
    python tests/mutations.py --only gdn_gate_missing_a,depo_edges_in_cycle_order
    python tests/mutations.py --check-targets    # only check that every target is found exactly once

Exit status 0 when every selected mutation is caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", "build", "dist"}


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files or node IDs (fastest catcher first: pytest runs with -x)
    what: str


MUTATIONS = [
    # --- model.py: Algorithm 1
    Mutation("stop_gradient_between_windows", "sleepjax/model.py",
             "carry, out = jax.lax.scan(lambda c, xs: window_fn(params, c, *xs), carry, xs)",
             "carry, out = jax.lax.scan(lambda c, xs: window_fn(params, jax.lax.stop_gradient(c), *xs), carry, xs)",
             ("tests/test_model_sleep_gradients.py",),
             "no gradient through the fast weights carried from one window to the next (BPTT through sleep)"),
    Mutation("stop_gradient_between_passes", "sleepjax/model.py",
             "h, new = one_pass(h, carries, i)",
             "h, new = one_pass(*jax.tree_util.tree_map(lambda x: jnp.where(i == 0, x, "
             "jax.lax.stop_gradient(x)), (h, carries)), i)",
             ("tests/test_model_sleep_gradients.py",),
             "no gradient from sleep pass n back into pass n-1"),
    Mutation("sleep_decided_over_the_batch", "sleepjax/model.py",
             "        sleeps = ~jnp.any(loss_mask, axis=1)",
             "        sleeps = jnp.broadcast_to(~jnp.any(loss_mask), loss_mask.shape[:1])",
             ("tests/test_model_per_example_sleep.py",),
             "a window sleeps only if NO example of the batch supervises it (the old batch-wide decision)"),
    Mutation("woken_example_takes_later_passes", "sleepjax/model.py",
             "        new_h = _select(keep, new_h, h)",
             "        new_h = _select(keep, new_h, new_h)",
             ("tests/test_model_per_example_sleep.py",),
             "an example that wakes in an M window gets the hidden states of the last pass"),
    Mutation("sleep_one_pass_short", "sleepjax/model.py",
             "    n, sleeps = cfg.sleep_n, None",
             "    n, sleeps = cfg.sleep_n - 1 or 1, None",
             ("tests/test_model_reference.py",),
             "a consolidation window gets N - 1 passes"),
    Mutation("declared_schedule_trusted", "sleepjax/train.py",
             "    misfits = schedule_lib.misfits(declared, loss_mask, window)",
             "    misfits = []",
             ("tests/test_train_grad_accum.py",),
             "the trainer runs the task's declared schedule without checking it fits the batch"),
    Mutation("micro_batch_mean_of_means", "sleepjax/step.py",
             "        return total / count, {",
             "        return total / jnp.maximum(mask.sum(), 1) / grad_accum, {",
             ("tests/test_train_grad_accum.py",),
             "gradient accumulation averages micro-batch means instead of dividing by the whole batch's count"),
    Mutation("padding_writes_fast_weights", "sleepjax/model.py",
             "    valid = jnp.arange(num_windows * L) < T",
             "    valid = jnp.arange(num_windows * L) < num_windows * L",
             ("tests/test_model_reference.py",),
             "the padding of a short last window is written into the fast weights"),
    Mutation("mlp_reads_norm1", "sleepjax/model.py",
             '            h = h + layers.mlp(p["mlp"], layers.norm(h, p["norm2"], cfg))',
             '            h = h + layers.mlp(p["mlp"], layers.norm(h, p["norm1"], cfg))',
             ("tests/test_model_reference.py",),
             "the MLP's pre-norm uses the mixer's norm weight"),
    Mutation("sleep_layers_ignored", "sleepjax/model.py",
             "    lo, hi = cfg.sleep_layer_range\n    depth = len(cfg.layers)\n    sliding = context is not None",
             "    lo, hi = 0, len(cfg.layers)\n    depth = len(cfg.layers)\n    sliding = context is not None",
             ("tests/test_model_reference.py",),
             "sleep_layers=(lo, hi) ignored: sleep loops every layer"),
    # --- layers.py: the block pieces
    Mutation("gdn_gate_missing_a", "sleepjax/layers.py",
             '    g = -jnp.exp(p["a_log"]) * jax.nn.softplus(a + p["dt_bias"])',
             '    g = -jax.nn.softplus(a + p["dt_bias"])',
             ("tests/test_model_reference.py",),
             "GDN log decay without its exp(A_log) factor"),
    Mutation("gdn_key_not_normalised", "sleepjax/layers.py",
             "    k = _l2_normalize(y[..., nq:2 * nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim)))",
             "    k = y[..., nq:2 * nq].reshape(lead + (cfg.gdn_heads, cfg.gdn_key_dim))",
             ("tests/test_model_reference.py",),
             "GDN keys not L2-normalised"),
    Mutation("gdn_output_norm_missing", "sleepjax/layers.py",
             '    o = rms_norm(o, p["o_norm"], cfg.norm_eps)  # norm_weight_offset does not apply here',
             '    o = o * p["o_norm"]',
             ("tests/test_model_reference.py",),
             "GDN output not RMS-normalised per head"),
    Mutation("conv_taps_reversed", "sleepjax/layers.py",
             "    return sum(xp[:, i:i + T] * w[i].astype(x.dtype) for i in range(K))",
             "    return sum(xp[:, i:i + T] * w[K - 1 - i].astype(x.dtype) for i in range(K))",
             ("tests/test_model_reference.py",),
             "causal conv taps in the wrong order (window path only: the stream would disagree)"),
    Mutation("swiglu_gate_and_up_swapped", "sleepjax/layers.py",
             '    return dense(jax.nn.silu(dense(x, p["w_gate"])) * dense(x, p["w_up"]), p["w_down"])',
             '    return dense(jax.nn.silu(dense(x, p["w_up"])) * dense(x, p["w_gate"]), p["w_down"])',
             ("tests/test_model_reference.py",),
             "SwiGLU with gate and up projections swapped"),
    Mutation("rope_frequencies_halved", "sleepjax/layers.py",
             "    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)",
             "    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / (2 * half))",
             ("tests/test_model_reference.py",),
             "RoPE frequencies theta^(-i/D) instead of theta^(-2i/D)"),
    Mutation("sliding_context_ignored", "kernels/attention_xla.py",
             "        mask &= (key >= context_len) | has_context",
             "        mask &= key >= context_len",
             ("tests/test_model_reference.py",),
             "sliding eviction: attention never sees the previous window's keys/values"),
    # --- layers.py: JetBlock and sliding-window attention (issue 19)
    Mutation("jet_conv_taps_reversed", "sleepjax/layers.py",
             "    conv_out = sum(up[:, j:j + T] * kernels[..., j] for j in range(K))",
             "    conv_out = sum(up[:, j:j + T] * kernels[..., K - 1 - j] for j in range(K))",
             ("tests/test_model_reference_jet.py", "tests/test_pretrained_jet.py"),
             "JetBlock dynamic conv taps in the wrong order (window path only)"),
    Mutation("jet_output_eps_ignored", "sleepjax/layers.py",
             '    o = rms_norm(o, p["o_norm"], cfg.jet_norm_eps)',
             '    o = rms_norm(o, p["o_norm"], cfg.norm_eps)',
             ("tests/test_model_reference_jet.py",),
             "JetBlock output norm with the model's eps instead of jet_norm_eps"),
    Mutation("swa_window_ignored_in_the_stream", "sleepjax/layers.py",
             "        return cached_attention_step(q, k_cache, v_cache, position, sliding_window=limit), carry",
             "        return cached_attention_step(q, k_cache, v_cache, position), carry",
             ("tests/test_model_reference_jet.py",),
             "a swa layer's one-token path attends to the whole window"),
    # --- stream.py
    Mutation("stream_sleeps_from_current_state", "sleepjax/stream.py",
             "    state = sleep(params, stream.window_start, stream.window_tokens, params.config.sleep_n, context)",
             "    state = sleep(params, stream.fast_weights, stream.window_tokens, params.config.sleep_n, context)",
             ("tests/test_model_reference.py", "tests/test_stream.py"),
             "the stream consolidates from the S after the wake tokens instead of the S at the window start"),
    Mutation("stream_conv_cache_kept", "sleepjax/stream.py",
             "    return stream.replace(fast_weights=state, window_start=state, kv_cache=kv, conv_cache=conv,",
             "    return stream.replace(fast_weights=state, window_start=state, kv_cache=kv, "
             "conv_cache=stream.conv_cache,",
             ("tests/test_model_reference.py",),
             "the GDN conv cache is not cleared at a window boundary (the conv must be window-local)"),
    # --- kernels
    Mutation("kernel_recurrence_no_decay", "kernels/gdn_reference.py",
             "    state = jnp.exp(g)[..., None, None] * state\n    if use_delta:",
             "    if use_delta:",
             ("tests/test_kernels_gdn.py", "tests/test_model_reference.py"),
             "the token recurrence (the oracle, the CPU forward and the decode step) forgets the decay"),
    Mutation("kernel_chunked_decay_grad_reversed", "kernels/gdn_chunked.py",
             "    below = jnp.flip(jnp.cumsum(jnp.flip(ct, -2), axis=-2), -2)  # below[t, j] = sum_{i >= t} ct[i, j]",
             "    below = jnp.cumsum(ct, axis=-2)",
             ("tests/test_model_sleep_gradients.py", "tests/test_kernels_gdn.py"),
             "the chunked algorithm's custom gradient of the log decay sums the wrong rows (gradients only: the "
             "CPU forward runs the recurrence)"),
    Mutation("kernel_attention_heads_tiled", "kernels/attention_xla.py",
             "    qg = q.reshape(B, Tq, Hkv, H // Hkv, D)",
             "    qg = q.reshape(B, Tq, H // Hkv, Hkv, D).swapaxes(2, 3)",
             ("tests/test_model_reference.py",),
             "grouped attention heads mapped h % Hkv instead of h // (H / Hkv)"),
    Mutation("kernel_attention_sees_next_token", "kernels/attention_xla.py",
             "    mask = key <= pos\n",
             "    mask = key <= pos + 1\n",
             ("tests/test_model_reference.py",),
             "the causal mask lets each query see the next token"),
    # --- tasks
    Mutation("depo_edges_in_cycle_order", "sleepjax/tasks/depo.py",
             "        edges = [words[i] + words[(i + 1) % n] + sep for i in rng.permutation(n)]",
             "        edges = [words[i] + words[(i + 1) % n] + sep for i in range(n)]",
             ("tests/test_tasks_depo.py",),
             "Depo edges listed in cycle order instead of shuffled"),
    Mutation("depo_hops_skewed", "sleepjax/tasks/depo.py",
             "rng.integers(1, self.hop_curriculum(index) + 1, size=self.questions).astype(np.int32))",
             "np.minimum(*rng.integers(1, self.hop_curriculum(index) + 1, size=(2, self.questions))).astype(np.int32))",
             ("tests/test_tasks_depo.py",),
             "training hops k skewed towards 1 (min of two uniform draws: every k still occurs)"),
    Mutation("depo_node_weights_wrong", "sleepjax/tasks/depo.py",
             "        weights = (1.0 / (self._node_counts + math.sqrt(self.max_nodes)) if self.train_n == \"weighted\"",
             "        weights = (1.0 / (self._node_counts + self.max_nodes) if self.train_n == \"weighted\"",
             ("tests/test_tasks_depo.py",),
             "training n weighted 1/(i + N) instead of 1/(i + sqrt(N))"),
    Mutation("gsm_op_skewed", "sleepjax/tasks/gsm_infinite.py",
             "(index % span if split == \"test\" else int(rng.integers(span)))",
             "(index % span if split == \"test\" else int(rng.integers(span, size=2).max()))",
             ("tests/test_tasks_gsm_infinite.py",),
             "GSM training op skewed towards op_max (max of two uniform draws: every op still occurs)"),
    Mutation("rule110_reads_last_bit", "sleepjax/tasks/rule110.py",
             "        return cells[:, 0].astype(np.int32)",
             "        return cells[:, -1].astype(np.int32)",
             ("tests/test_tasks_rule110.py",),
             "Rule 110 label from the last cell instead of bit 0"),
    # --- evaluation
    Mutation("eval_per_difficulty_is_overall", "sleepjax/evaluate.py",
             '        metrics[f"exact/{difficulty_name}={d}"] = float(np.mean(exact[d]))',
             '        metrics[f"exact/{difficulty_name}={d}"] = metrics["exact"]',
             ("tests/test_evaluate.py",),
             "every difficulty reports the overall exact accuracy"),
    Mutation("eval_item_exact_if_any_position_right", "sleepjax/evaluate.py",
             '        "exact": (wrong == 0) & (count > 0),',
             '        "exact": (wrong < count) & (count > 0),',
             ("tests/test_evaluate.py",),
             "an item counts as exact when any (not every) position is right"),
    # --- training and checkpoints (their tests are tests/test_train_preemption.py and tests/test_train.py)
    Mutation("no_final_checkpoint", "sleepjax/train.py",
             "            if done % cfg.checkpoint_every == 0 or done == cfg.steps:  # the final step always",
             "            if done % cfg.checkpoint_every == 0:",
             ("tests/test_train_preemption.py", "tests/test_experiments_launchers.py"),
             "no checkpoint at the final step when steps is not a multiple of checkpoint_every"),
    Mutation("restart_retrains_from_step_0", "sleepjax/train.py",
             "        for step in range(self.start, cfg.steps):",
             "        for step in range(0, cfg.steps):",
             ("tests/test_train_preemption.py", "tests/test_train.py"),
             "a restarted run (finished or interrupted) trains again from step 0 on top of its checkpoint"),
    Mutation("resume_replays_batches", "sleepjax/train.py",
             "        batch = self.prefetch.get(step)",
             "        batch = self.prefetch.get(step - self.start)",
             ("tests/test_train_preemption.py", "tests/test_train.py"),
             "a resumed run trains on the batches of steps 0, 1, ... again instead of continuing the stream"),
    # --- launchers
    # (a mutation must never let a sweep's children sweep again or train a full preset: they would outlive pytest)
    Mutation("sweep_children_lose_task_overrides", "experiments/common.py",
             '    return [sys.executable, "-m", module, *_for_children(_ARGS), *run.flags, f"--workdir={workdir}"]',
             '    return [sys.executable, "-m", module, *[a for a in _for_children(_ARGS) if "config.task." not in a], '
             '*run.flags, f"--workdir={workdir}"]',
             ("tests/test_experiments_launchers.py",),
             "the children of a parallel sweep run without the task overrides given to the parent"),
    Mutation("sweep_children_train_the_parents_seed", "experiments/common.py",
             '        out = [f"--sleep_n={self.sleep_n}", f"--config.train.seed={self.seed}", '
             'f"--baseline={self.baseline}"]',
             '        out = [f"--sleep_n={self.sleep_n}", f"--baseline={self.baseline}"]',
             ("tests/test_experiments_launchers.py",),
             "every child of a --seeds sweep trains with the config's seed instead of its own"),
    Mutation("removed_flag_without_its_replacement", "experiments/common.py",
             '        section = next((s for s in ("task", "train", "model") if name in sections[s]), None)',
             "        section = None",
             ("tests/test_experiments_common.py",),
             "a flag that became a config field (--steps=10) is only 'unknown', not told its replacement"),
]


def copy_tree(dst: Path) -> None:
    """The working tree (tracked or not, without .git, the venv and caches) into dst, plus sleepjax/kernels ->
    kernels so that the copy imports its own kernels (the editable install maps sleepjax.kernels to the original)."""
    def ignore(folder, names):
        return {n for n in names if n in SKIP or n.endswith(".egg-info") or n.startswith("workdir")}
    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    (dst / "sleepjax" / "kernels").symlink_to(Path("..") / "kernels", target_is_directory=True)


def environment(copy: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(copy), "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
            "PYTHONDONTWRITEBYTECODE": "1"}


def check_imports(copy: Path) -> None:
    code = ("import sleepjax, sleepjax.kernels, sleepjax.kernels.gdn, experiments.common as c; "
            "print(sleepjax.__file__); print(sleepjax.kernels.gdn.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=environment(copy), capture_output=True,
                         text=True, check=True)
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(copy.resolve()):
            raise SystemExit(f"the copy imports {line} from outside {copy}: the check would test the original")


def check_targets(mutations, root: Path) -> list[str]:
    problems = []
    for m in mutations:
        path = root / m.path
        count = path.read_text().count(m.old) if path.exists() else -1
        if count != 1:
            where = "file missing" if count < 0 else f"found {count} times"
            problems.append(f"{m.name}: target text in {m.path}: {where}")
        for test in m.tests:
            if not (root / test.split("::")[0]).exists():
                problems.append(f"{m.name}: test file {test} does not exist")
    return problems


def run_pytest(copy: Path, tests, timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'error' | 'timeout', seconds, first failure lines). pytest runs in its own process
    group, killed whole on timeout (the launcher tests start children of their own)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests],
                            cwd=copy, env=environment(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.time() - start, ""
    status = {0: "pass", 1: "fail"}.get(proc.returncode, "error")
    lines = [l for l in stdout.splitlines() if l.startswith(("FAILED", "ERROR"))] or stdout.splitlines()[-3:]
    return status, time.time() - start, "\n".join(lines[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--check-targets", action="store_true", help="only check the target texts")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per pytest run")
    args = parser.parse_args()

    selected = MUTATIONS
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {m.name for m in MUTATIONS}
        if unknown:
            raise SystemExit(f"unknown mutations: {sorted(unknown)}")
        selected = [m for m in MUTATIONS if m.name in names]
    if args.list:
        for m in selected:
            print(f"{m.name:40s} {m.path:32s} {', '.join(m.tests)}\n    {m.what}")
        return 0
    problems = check_targets(selected, REPO)
    if problems:
        raise SystemExit("mutation targets out of date:\n  " + "\n  ".join(problems))
    if args.check_targets:
        print(f"all {len(selected)} targets found exactly once")
        return 0

    with tempfile.TemporaryDirectory(prefix="sleepjax-mutations-") as tmp:
        copy = Path(tmp) / "tree"
        copy_tree(copy)
        check_imports(copy)
        if not args.no_baseline:  # each named file once, unmutated: it must pass for a failure to mean anything
            for test in sorted({t for m in selected for t in m.tests}):
                status, seconds, tail = run_pytest(copy, [test], args.timeout)
                print(f"baseline (unmutated) {test}: {status} in {seconds:.0f}s", flush=True)
                if status != "pass":
                    raise SystemExit(f"{test} fails without any mutation:\n{tail}")
        caught = []
        for m in selected:
            path = copy / m.path
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                status, seconds, tail = run_pytest(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            ok = status in ("fail", "error")  # a timeout proves nothing: counted as not caught
            caught.append(ok)
            note = "" if status == "fail" else f" ({status})"
            print(f"{'caught' if ok else 'NOT CAUGHT':10s} {m.name:40s} {seconds:6.0f}s{note}  {m.what}", flush=True)
            if tail and ok:
                print("           " + tail.replace("\n", "\n           "), flush=True)
    print(f"\ncaught {sum(caught)}/{len(caught)}")
    return 0 if all(caught) else 1


if __name__ == "__main__":
    sys.exit(main())
