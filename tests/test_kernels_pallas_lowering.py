"""The Pallas kernels lower for real GPUs (Triton) and TPUs (Mosaic) from this CPU-only machine.

``jax.export`` with platforms=["cuda"] / ["tpu"] runs the actual Pallas -> Triton / Pallas -> Mosaic lowering of
every kernel (the GDN state scan and its reverse; flash attention forward, dK/dV, dQ), forward and backward (the
VJP), with the default block sizes: unsupported primitives (cumsum,
triangular_solve), captured array constants, non-power-of-two Triton shapes and illegal TPU block shapes all fail
here. Necessary, not sufficient: the Triton/Mosaic compilers themselves only run on the device.
"""

import jax
import jax.numpy as jnp
import pytest

from jax.experimental.pallas import triton as pltriton

from sleepjax.kernels import attention_pallas, gdn_pallas

# The Pallas Triton custom call has no export-compatibility guarantee: allow it explicitly (JAX >= 0.11 exports
# its name as pltriton.CUSTOM_CALL_TARGET_NAME).
TRITON_TARGET = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
DISABLED = [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)]
TARGETS = {"cuda": TRITON_TARGET, "tpu": "tpu_custom_call"}
S = jax.ShapeDtypeStruct


def gdn_case(Dk, Dv, dtype, use_delta, T=300):
    B, Hk, Hv = 1, 2, 4
    args = (S((B, T, Hk, Dk), dtype), S((B, T, Hk, Dk), dtype), S((B, T, Hv, Dv), dtype), S((B, T, Hv), jnp.float32),
            S((B, T, Hv), jnp.float32), S((B, Hv, Dk, Dv), jnp.float32))

    def make(platform):
        return lambda *a: gdn_pallas.gated_delta_rule_pallas(*a, use_delta=use_delta, interpret=False,
                                                             platform=platform)
    return make, args, (1, 2)  # kernels in forward (state scan), in forward + backward (+ reverse scan)


def attention_case(T, D, dtype, window):
    B, H, Hkv = 1, 4, 2
    args = (S((B, T, H, D), dtype), S((B, T, Hkv, D), dtype), S((B, T, Hkv, D), dtype))

    def make(platform):
        return lambda *a: attention_pallas.window_attention_pallas(*a, sliding_window=window, interpret=False,
                                                                   platform=platform)
    return make, args, (1, 3)


CASES = {
    "gdn-delta-d128-bf16": lambda: gdn_case(128, 128, jnp.bfloat16, True),  # T = 300: 5 chunks, Tp not 2^k
    "gdn-hebb-d128-bf16": lambda: gdn_case(128, 128, jnp.bfloat16, False),
    "gdn-delta-d32-f32": lambda: gdn_case(32, 32, jnp.float32, True, T=200),  # the tiny model's head dim
    "gdn-delta-dk64-dv48-bf16": lambda: gdn_case(64, 48, jnp.bfloat16, True),  # Dv padded to 64
    "attn-w128-d128-bf16": lambda: attention_case(512, 128, jnp.bfloat16, 128),
    "attn-causal-d64-f32": lambda: attention_case(200, 64, jnp.float32, None),
    "attn-w16-d32-bf16": lambda: attention_case(100, 32, jnp.bfloat16, 16),
}


def _with_vjp(f):
    def fb(*a):
        out, vjp = jax.vjp(f, *a)
        return vjp(out)
    return fb


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_lowers(name, platform, mode):
    make, args, (n_fwd, n_bwd) = CASES[name]()
    f = make("gpu" if platform == "cuda" else "tpu")
    fn = f if mode == "fwd" else _with_vjp(f)
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED)(*args)
    text = exported.mlir_module()
    assert text.count(TARGETS[platform]) >= (n_fwd if mode == "fwd" else n_bwd), "pallas kernels missing"


def test_triton_export_needs_explicit_opt_in():
    """Documents why DISABLED is needed: without it jax.export refuses the (unstable) Triton custom call."""
    make, args, _ = CASES["gdn-delta-d32-f32"]()
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        jax.export.export(jax.jit(make("gpu")), platforms=["cuda"])(*args)


def test_bench_script_smoke(tmp_path):
    """bench/kernels.py runs end to end on CPU (interpret mode) with tiny sizes and writes its JSON report."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rows = bench.main(["--seq", "16", "--heads", "1", "--head-dim", "16", "--window", "8", "--iters", "1",
                       "--warmup", "0", "--impls", "pallas", "--json", str(out)])
    assert {(r["kernel"], r["impl"], r["mode"]) for r in rows} == {
        (k, "pallas", m) for k in ("gdn", "gdn_scan", "attention") for m in ("fwd", "fwd+bwd")}
    assert all(r["compile_s"] > 0 for r in rows)
    assert all(r["ms"] > 0 and r["roofline"] > 0 for r in rows if r["kernel"] != "gdn_scan")
    assert json.loads(out.read_text())["results"] == rows
