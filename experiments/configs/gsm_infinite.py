r"""GSM-Infinite (clean-room generator): question first, statements consolidated window by window, then the
answer with no chain of thought; accuracy per op count.

    python -m experiments.gsm_infinite --sleep_n=8                                # tiny, CPU
    python -m experiments.gsm_infinite --sweep_n=1,4 --config.task.op_max=3       # CPU-scale comparison
    python -m experiments.gsm_infinite --config=paper --sweep_n=1,4,6 --config.train.mesh=data:8   # GPU/TPU host
    # fine-tune a local Qwen3.5 checkpoint (its model and tokenizer), the middle 14 of 28 layers sleeping:
    python -m experiments.gsm_infinite --config=paper --config.train.init_from=/ckpt/qwen3.5 --sleep_n=4 \
        --config.model.sleep_layers=7,21 --config.model.dtype=bfloat16 --config.model.remat=both

The paper fine-tuned pretrained 1.4-2B hybrids; the ``paper`` presets train the 4-layer d=256 model from scratch
on the paper-length problems (2,000-3,300 tokens, window 2000).
"""

import ml_collections as mlc

from experiments.configs import common

PRESETS = {
    "tiny": "CPU scale, d=64, medium subset",
    "tiny_hard": "CPU scale, d=64, hard subset",
    "tiny_symbolic": "CPU scale, d=64, symbolic subset",
    "paper": "paper-length problems (stream layout), d=256, medium subset",
    "paper_hard": "paper-length problems (stream layout), d=256, hard subset",
    "paper_symbolic": "paper-length problems (stream layout), d=256, symbolic subset",
    "paper_sliding": "the paper's sliding-window setting: windows of 512, problems 4-6 windows long, sliding "
                     "eviction (warm up with --config.model.eviction=hard first, or "
                     "--config.train.warmup_eviction_steps)",
}

# The published benchmark from local files (sleepjax/tasks/gsm_infinite_benchmark.py), off in every preset:
# --config.task.benchmark_path=DIR_OR_FILE evaluates on its rows (--config.task.benchmark_train_path trains on
# some), --config.task.benchmark_ops=2,10 / benchmark_template / benchmark_mode filter them; the rows need
# --config.task.tokenizer (or train.init_from) unless written in the closed vocabulary.
_BENCHMARK = dict(benchmark_path=None, benchmark_train_path=None, benchmark_ops=0, benchmark_template=None,
                  benchmark_mode=None)
# tiny*: 2-10 short statements over a 2 places x 2 categories x 3 items world, constants 1..9, op <= 4 (5 in hard),
# texts of ~25-125 tokens (mean ~60) in 2 windows of 64 (3 for hard); the whole problem is evicted before the answer.
_TINY = dict(subset="medium", op_min=1, op_max=4, distractors=(1, 2), noise=(0, 1), fill_tokens=0, places=2,
             categories=2, items=3, const_max=9, var_digits=2, window=64, context_len=128, layout="evict",
             tokenizer=None, **_BENCHMARK)
# paper*: op 1..8, texts filled to 2000-3300 tokens, windows of 2000 from the start of the text (stream layout):
# the first window is consolidated, the rest of the problem and the answer share the second.
_PAPER = dict(subset="medium", op_min=1, op_max=8, distractors=(2, 6), noise=(2, 6), fill_tokens=(2000, 3300),
              places=10, categories=6, items=6, const_max=20, var_digits=6, window=2000, context_len=4000,
              layout="stream", tokenizer=None, **_BENCHMARK)
TASKS = {
    "tiny": _TINY,
    "tiny_hard": dict(_TINY, subset="hard", op_max=5, context_len=192),
    "tiny_symbolic": dict(_TINY, subset="symbolic", distractors=(1, 3), noise=(0, 2)),
    "paper": _PAPER,
    "paper_hard": dict(_PAPER, subset="hard"),
    "paper_symbolic": dict(_PAPER, subset="symbolic"),
    # the paper's sliding-window setting: windows of 512, problems 4-6 windows long
    "paper_sliding": dict(_PAPER, fill_tokens=(2048, 3000), window=512, context_len=3072),
}


def get_config(arg=None):
    preset = common.preset(arg, PRESETS)
    config = mlc.ConfigDict()
    # distractors, noise, fill_tokens and benchmark_ops are an int or a (lo, hi) range:
    # --config.task.fill_tokens=2000,3300
    ranges = ("distractors", "noise", "fill_tokens", "benchmark_ops")
    config.task = common.task(**{k: common.either(v) if k in ranges else v for k, v in TASKS[preset].items()})
    if preset.startswith("tiny"):
        config.model = common.model("tiny")
        config.train = common.train(steps=1200, batch_size=32, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100,
                                    eval_every=200, eval_size=512, checkpoint_every=200)
    else:
        config.model = common.model("paper", eviction="sliding" if preset == "paper_sliding" else "hard")
        config.train = common.train(steps=20_000, batch_size=256, muon_lr=1e-3, adam_lr=5e-5, warmup_steps=500,
                                    eval_every=1000, eval_size=1600, checkpoint_every=1000)
    return config
