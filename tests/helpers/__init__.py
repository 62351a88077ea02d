"""What the tests share (imported as ``helpers.<module>``: tests/ is on sys.path, see tests/conftest.py).

compare          case_key (fresh inputs per case), rel_err, assert_trees_close, assert_bitwise_equal
numpy_reference  the independent float64 NumPy model, and the one float64 gated-delta-rule token recurrence
kernels          random mixer inputs (GDN make_inputs with its hard cases, attention make_qkv), the float64
                 attention references, the Pallas interpreter choice
models           small sleepjax models for model-level tests (SMALL, TINY, make_params, random_tokens, run_stream)
runs             training runs: the MICRO model and micro_setup, checkpoints, metrics, waiting on children
depo             reading a Depo sequence back as text (parse, follow) and the CPU-scale Depo
"""
