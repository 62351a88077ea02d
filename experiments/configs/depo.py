r"""Depo (paper Fig. 3): k-hop questions about a directed cycle whose edges were consolidated, then evicted.

    python -m experiments.depo --sweep_n=1,4 --seeds=0,1 --parallel=2        # tiny: the README's CPU main job
    python -m experiments.depo --config=tiny_k4 --config.task.hop_stage=500   # any field: --config.<section>.<field>
    python -m experiments.depo --config=paper --sweep_n=1,2,4 --config.train.mesh=data:8   # a GPU/TPU host
    python -m experiments.depo --config=experiments/configs/depo.py:paper     # a config file by its path
"""

import ml_collections as mlc

from experiments.configs import common

PRESETS = {
    "tiny": "CPU scale: 8 one-token nodes in one 24-token window, k in 1..2, layers attn-gdn, d=64",
    "tiny_k4": "previous CPU main job: 8 one-token nodes, k in 1..4, layers attn-gdn-attn-gdn, d=64",
    "paper": "paper: N<=75 nodes, 2-token words, context 300, window 75, k<=16, 10 layers d=512",
}

# The CPU-scale graph a prototype showed the effect in: 8 one-token nodes whose edges fill one 24-token window.
CPU_TASK = dict(max_nodes=8, min_nodes=8, max_hops=4, alphabet=32, word_len_min=1, word_len_max=1, questions=16,
                window=24, context_len=24, sep=True, bos=False, train_n="uniform", test_hops="all", hop_stage=0,
                distinct_questions="none")
# The paper's: cycles of 3..75 two-token words, the edges in a 300-token context of windows of 75, k <= 16.
PAPER_TASK = dict(max_nodes=75, min_nodes=3, max_hops=16, alphabet=50, word_len_min=2, word_len_max=2, questions=10,
                  window=75, context_len=300, sep=False, bos=False, train_n="weighted", test_hops="powers",
                  hop_stage=0, distinct_questions="none")


def get_config(arg=None):
    preset = common.preset(arg, PRESETS)
    config = mlc.ConfigDict()
    if preset == "tiny":
        # One GDN layer: a wake pass reads the fast weights once, so a 2-hop answer needs an association that
        # composes two edges. Sleep can write one (pass n's write carries what pass n-1's read returned); a single
        # pass can only partly (the delta rule's erase term reads before it writes: docs/depo_search.md).
        # k in 1..2; held-out questions never repeat a (query, k) pair, so no answer is copied from an earlier
        # question. Batch 16 and 4,400 steps: chosen by the screens in docs/depo_search.md. The rates are half of
        # tiny_k4's: at those, half of the N = 4 runs stayed on the two-hop plateau (docs/depo_out_of_sample.md);
        # these were validated on seeds 20-29 (docs/depo_half_rates_fresh.md).
        config.model = common.model("tiny", layers=("attn", "gdn"))
        config.task = common.task(**dict(CPU_TASK, max_hops=2, distinct_questions="test"))
        config.train = common.train(steps=4400, batch_size=16, muon_lr=0.01, adam_lr=1.5e-3, warmup_steps=100,
                                    eval_every=400, eval_size=512, eval_batch_size=256, checkpoint_every=1100)
    elif preset == "tiny_k4":
        # The previous main job (docs/depo_previous_results.md, docs/depo_long_results.md).
        config.model = common.model("tiny")
        config.task = common.task(**CPU_TASK)
        config.train = common.train(steps=2200, batch_size=32, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100,
                                    eval_every=200, eval_size=512, eval_batch_size=256, checkpoint_every=500)
    else:
        config.model = common.model("depo_paper")
        config.task = common.task(**PAPER_TASK)
        config.train = common.train(steps=50_000, batch_size=128, muon_lr=2e-3, adam_lr=5e-5, warmup_steps=1000,
                                    eval_every=1000, eval_size=4096, checkpoint_every=1000)
    return config
