"""Backend names and ``backend="auto"`` resolution (kernels/backends.py), the cuDNN fallback, and the path without
the Pallas Triton lowering (deprecated from JAX 0.11)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import numpy_reference as ref
from helpers.compare import case_key, rel_err
from helpers.kernels import make_inputs
from sleepjax.kernels import _pallas_util, attention, backends, gdn, gdn_pallas


def test_backend_names_are_the_dispatchers():
    assert gdn.BACKENDS == ("auto", "xla", "recurrent", "chunked", "pallas")
    assert attention.BACKENDS == ("auto", "xla", "pallas", "cudnn")


@pytest.mark.parametrize("platform,expected", [("cpu", "xla"), ("gpu", "chunked"), ("cuda", "chunked"),
                                               ("rocm", "chunked"), ("tpu", "chunked")])
def test_gdn_auto_per_platform(platform, expected):
    """GPU and TPU: the chunked XLA path until the Pallas path is measured faster there (never the token
    recurrence)."""
    assert backends.resolve_gdn_backend("auto", platform) == expected
    assert backends.resolve_gdn_backend("recurrent", platform) == "recurrent"


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_takes_pallas_only_once_measured_faster(monkeypatch, platform):
    """The one rule on both accelerators: flipping a platform's *_MEASURED_FASTER constant (and only that one)
    makes auto pick Pallas there."""
    monkeypatch.setattr(_pallas_util, "pltriton", type("T", (), {"CompilerParams": object}))  # Triton present
    other = "TPU" if platform == "gpu" else "GPU"
    for name in (f"{other}_GDN_PALLAS_MEASURED_FASTER", f"{other}_ATTENTION_PALLAS_MEASURED_FASTER"):
        monkeypatch.setattr(backends, name, True)
    before = (backends.resolve_gdn_backend("auto", platform),
              backends.resolve_attention_backend("auto", dtype="bfloat16", head_dim=128, platform=platform))
    assert before == ("chunked", "cudnn" if platform == "gpu" else "xla")
    monkeypatch.setattr(backends, f"{platform.upper()}_GDN_PALLAS_MEASURED_FASTER", True)
    monkeypatch.setattr(backends, f"{platform.upper()}_ATTENTION_PALLAS_MEASURED_FASTER", True)
    assert backends.resolve_gdn_backend("auto", platform) == "pallas"
    assert backends.resolve_attention_backend("auto", dtype="bfloat16", head_dim=128, platform=platform) == "pallas"


@pytest.mark.parametrize("platform,dtype,head_dim,expected", [
    ("cpu", "bfloat16", 128, "xla"), ("tpu", "bfloat16", 128, "xla"), ("tpu", "float32", 64, "xla"),  # no cuDNN
    ("gpu", "bfloat16", 128, "cudnn"), ("gpu", "float16", 64, "cudnn"),
    ("gpu", "float32", 128, "pallas"),    # cuDNN flash attention has no float32
    ("gpu", "bfloat16", 100, "pallas"),   # head dim not a multiple of 8
    ("gpu", "bfloat16", 256, "pallas"),   # above 128
])
def test_attention_auto_per_platform(platform, dtype, head_dim, expected):
    assert backends.resolve_attention_backend("auto", dtype=dtype, head_dim=head_dim, platform=platform) == expected


def test_bad_backend_names_raise():
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_gdn_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_attention_backend("chunked", dtype="float32", head_dim=16)
    with pytest.raises(ValueError, match="platform must be one of"):
        backends.resolve_gdn_backend("auto", "metal")


def test_without_triton_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_pallas_util, "pltriton", None)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "GPU_GDN_PALLAS_MEASURED_FASTER", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [backends.resolve_gdn_backend("auto", "gpu") for _ in range(3)] == ["chunked"] * 3
        assert [backends.resolve_attention_backend("auto", dtype="float32", head_dim=64, platform="gpu")
                for _ in range(3)] == ["xla"] * 3
    assert len([w for w in caught if "Triton" in str(w.message)]) == 2  # one per mixer
    monkeypatch.setattr(_pallas_util, "pltriton", type("T", (), {"CompilerParams": object}))
    assert backends.resolve_gdn_backend("auto", "gpu") == "pallas"


def test_without_triton_explicit_gpu_pallas_raises_but_interpret_runs(monkeypatch):
    monkeypatch.setattr(_pallas_util, "pltriton", None)
    args = make_inputs(case_key("no-triton"), B=1, T=20, Hk=1, Hv=1, Dk=16, Dv=16)
    with pytest.raises(RuntimeError, match="Triton"):
        gdn_pallas.gated_delta_rule_pallas(*args, platform="gpu", interpret=False)
    o, s = gdn_pallas.gated_delta_rule_pallas(*args, platform="gpu", interpret=True)  # no Triton params needed
    o_ref, s_ref = ref.gated_delta_rule(*args)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_auto_attention_falls_back_when_cudnn_refuses(monkeypatch):
    """On a (pretended) GPU, bf16 attention picks cuDNN; on this CPU-only JAX cuDNN raises at trace time, so
    `auto` warns once and runs the fallback (Pallas, interpreted), while an explicit backend="cudnn" raises."""
    monkeypatch.setattr(backends, "platform_kind", lambda platform=None: "gpu")
    monkeypatch.setattr(backends, "_warned", set())
    ks = jax.random.split(case_key("cudnn-fallback"), 3)
    q, k, v = (jax.random.normal(kk, (1, 24, 2, 16)).astype(jnp.bfloat16) for kk in ks)
    with pytest.warns(RuntimeWarning, match="cuDNN refused"):
        o = attention.window_attention(q, k, v, sliding_window=5)
    ref = attention.xla_window_attention(q, k, v, sliding_window=5)
    assert o.dtype == jnp.bfloat16 and rel_err(o, ref) < 2e-2
    with pytest.raises(RuntimeError, match="cuDNN"):
        attention.window_attention(q, k, v, backend="cudnn")


def test_gdn_auto_on_cpu_is_the_xla_backend():
    args = make_inputs(case_key("auto-cpu"), T=40)  # test_kernels_gdn's shapes: the compiled recurrence is reused
    o_auto, s_auto = gdn.gated_delta_rule(*args)
    o_xla, s_xla = gdn.gated_delta_rule(*args, backend="xla")
    np.testing.assert_array_equal(np.asarray(o_auto), np.asarray(o_xla))
    np.testing.assert_array_equal(np.asarray(s_auto), np.asarray(s_xla))
