r"""GSM-Infinite (clean-room generator): question first, statements consolidated window by window, then the
answer with no chain of thought; accuracy per op count.

    python -m experiments.gsm_infinite --sleep_n=8                                # tiny, CPU
    python -m experiments.gsm_infinite --sweep_n=1,4 --config.task.op_max=3       # CPU-scale comparison
    python -m experiments.gsm_infinite --config=paper --sweep_n=1,4,6 --config.train.mesh=data:8   # GPU/TPU host
    # the paper's runs: fine-tune a local checkpoint (its model and tokenizer) with sleep, one command each
    python -m experiments.gsm_infinite --config=paper_jet_nemotron --config.train.init_from=/ckpt/Jet-Nemotron-2B \
        --sweep_n=1,2,4,6
    python -m experiments.gsm_infinite --config=paper_ouro --config.train.init_from=/ckpt/Ouro-1.4B --sweep_n=1,4
    python -m experiments.gsm_infinite --config=paper_ouro_sliding --config.train.init_from=/ckpt/Ouro-1.4B \
        --sweep_n=1,4

The ``paper``, ``paper_hard``, ``paper_symbolic`` and ``paper_sliding`` presets train the 4-layer d=256 model from
scratch on the paper-length problems (2,000-3,300 tokens, window 2000; 512 for sliding).
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
    "paper_sliding": "the paper's sliding-window setting from scratch: windows of 512, problems 4-6 windows long, "
                     "a fixed training set, one epoch of hard eviction (the warm-up), then two of sliding eviction",
    # The paper's fine-tuning runs: each needs --config.train.init_from=DIR, a local checkpoint of that model.
    "paper_jet_nemotron": "the paper's Jet-Nemotron-2B run: fine-tune it on paper-length problems, window 2000, the "
                          "middle 14 of its 28 blocks sleeping (sleep_layers=7,21); the paper's N: --sweep_n=1,2,4,6",
    "paper_ouro": "the paper's Ouro-1.4B run: 6 MLP-free JetBlocks inserted, every block looping (Ouro's 4 loops "
                  "per pass, the sleep passes over the whole looped stack), window 2000; --sweep_n=1,4",
    "paper_ouro_sliding": "the paper's sliding-window run (section 6.4): Ouro-1.4B + 6 JetBlocks, windows of 512, one "
                          "epoch of only the new layers under hard eviction, then two epochs of everything under "
                          "sliding eviction; --sweep_n=1,4",
}
# What a fine-tuning preset's init_from holds until the command line gives a checkpoint directory.
REQUIRED_CHECKPOINT = {
    "paper_jet_nemotron": "a local Jet-Nemotron-2B checkpoint directory",
    "paper_ouro": "a local Ouro-1.4B checkpoint directory",
    "paper_ouro_sliding": "a local Ouro-1.4B checkpoint directory",
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
TASKS["paper_jet_nemotron"] = TASKS["paper_ouro"] = _PAPER
TASKS["paper_ouro_sliding"] = TASKS["paper_sliding"]
# The sliding recipe (paper section 6.4) counts epochs over a fixed training set; its size is our choice (not in
# the paper as we read it): from scratch 1.6M problems (3 epochs ~ the 20,000 steps of the other paper presets),
# fine-tuning 100k. One epoch of warm-up (hard eviction; only the inserted layers train when there are some), then
# two of everything under sliding eviction.


def get_config(arg=None):
    preset = common.preset(arg, PRESETS)
    config = mlc.ConfigDict()
    # distractors, noise, fill_tokens and benchmark_ops are an int or a (lo, hi) range:
    # --config.task.fill_tokens=2000,3300
    ranges = ("distractors", "noise", "fill_tokens", "benchmark_ops")
    config.task = common.task(**{k: common.either(v) if k in ranges else v for k, v in TASKS[preset].items()})
    sliding = preset in ("paper_sliding", "paper_ouro_sliding")
    if preset.startswith("tiny"):
        config.model = common.model("tiny")
        config.train = common.train(steps=1200, batch_size=32, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100,
                                    eval_every=200, eval_size=512, checkpoint_every=200)
    elif preset in REQUIRED_CHECKPOINT:
        # The checkpoint's model (the model section's sizes are ignored under init_from), in bfloat16 activations
        # with float32 master weights, a checkpoint around every window and pass, parameters sharded (fsdp).
        config.model = common.model("tiny", dtype="bfloat16", remat="both", eviction="sliding" if sliding else "hard",
                                    sleep_layers=(7, 21) if preset == "paper_jet_nemotron" else None)
        ouro = dict(insert_gdn=6, insert_kind="jet") if preset.startswith("paper_ouro") else {}
        recipe = dict(train_examples=100_000, epochs=3, warmup_epochs=1, freeze="pretrained") if sliding else {}
        config.train = common.train(init_from=common.required(REQUIRED_CHECKPOINT[preset]), steps=2000,
                                    batch_size=256, muon_lr=1e-3, adam_lr=5e-5, warmup_steps=100, eval_every=200,
                                    eval_size=1600, checkpoint_every=200, mesh="fsdp:-1", **ouro, **recipe)
    else:
        config.model = common.model("paper", eviction="sliding" if sliding else "hard")
        recipe = dict(train_examples=1_600_000, epochs=3, warmup_epochs=1) if sliding else {}
        config.train = common.train(steps=20_000, batch_size=256, muon_lr=1e-3, adam_lr=5e-5, warmup_steps=500,
                                    eval_every=1000, eval_size=1600, checkpoint_every=1000, **recipe)
    return config
