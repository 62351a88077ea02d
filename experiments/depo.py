"""Depo (paper Fig. 3): k-hop questions about a directed cycle whose edges were consolidated, then evicted.

    python -m experiments.depo --sweep_n=1,4 --seeds=0,1 --parallel=2      # the README's CPU main job
    python -m experiments.depo --config=paper --sweep_n=1,2,4 --mesh=data:8 # paper scale on a GPU/TPU host
"""

from absl import app, flags

from experiments import common

PRESETS = {
    "tiny": common.Preset(
        # One GDN layer: a wake pass reads the fast weights once, so a 2-hop answer needs an association that
        # composes two edges. Sleep can write one (pass n's write carries what pass n-1's read returned); a single
        # pass can only partly (the delta rule's erase term reads before it writes: docs/depo_search.md).
        # k in 1..2; held-out questions never repeat a (query, k) pair, so no answer is copied from an earlier
        # question. Batch 16 and 4,400 steps: chosen by the screens in docs/depo_search.md.
        model="tiny", model_overrides=dict(layers=("attn", "gdn")),
        task=dict(preset="cpu", max_hops=2, distinct_questions="test"),
        train=dict(steps=4400, batch_size=16, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100, eval_every=400,
                   eval_size=512, eval_batch_size=256, checkpoint_every=1100),
        description="CPU scale: 8 one-token nodes in one 24-token window, k in 1..2, layers attn-gdn, d=64"),
    "tiny_k4": common.Preset(
        # The previous main job (docs/depo_previous_results.md, docs/depo_long_results.md).
        model="tiny", task=dict(preset="cpu"),
        train=dict(steps=2200, batch_size=32, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100, eval_every=200,
                   eval_size=512, eval_batch_size=256, checkpoint_every=500),
        description="previous CPU main job: 8 one-token nodes, k in 1..4, layers attn-gdn-attn-gdn, d=64"),
    "paper": common.Preset(
        model="depo_paper", task=dict(preset="paper"),
        train=dict(steps=50_000, batch_size=128, muon_lr=2e-3, adam_lr=5e-5, warmup_steps=1000, eval_every=1000,
                   eval_size=4096, checkpoint_every=1000),
        description="paper: N<=75 nodes, 2-token words, context 300, window 75, k<=16, 10 layers d=512"),
}

common.define_config_flag(PRESETS, "tiny")
flags.DEFINE_integer("max_nodes", None, "Largest cycle (test graphs have exactly this many nodes).", lower_bound=2)
flags.DEFINE_integer("min_nodes", None, "Smallest training cycle.", lower_bound=2)
flags.DEFINE_integer("max_hops", None, "K: hops asked in training are uniform in 1..K.", lower_bound=1)
flags.DEFINE_integer("alphabet", None, "V: tokens per word-position alphabet.", lower_bound=1)
flags.DEFINE_integer("questions", None, "Questions per example.", lower_bound=1)
flags.DEFINE_integer("context_len", None, "Tokens of the (consolidated) edge context.", lower_bound=1)
flags.DEFINE_enum("train_n", None, ["weighted", "uniform"], "Training distribution of the cycle size.")
flags.DEFINE_enum("test_hops", None, ["powers", "all"], "Hops evaluated: powers of two up to K, or all of 1..K.")
flags.DEFINE_integer("hop_stage", None, "Hop curriculum: the largest k asked in training grows by one every this "
                     "many training sequences (0 = off: k uniform in 1..K from the start).", lower_bound=0)
flags.DEFINE_enum("distinct_questions", None, ["none", "test", "all"], "No (query, k) pair asked twice in one "
                  "example before every pair was asked (no copying an earlier identical question's answer): in no "
                  "split, in the held-out split only, or in both.")

TASK_FLAGS = ("max_nodes", "min_nodes", "max_hops", "alphabet", "questions", "context_len", "train_n", "test_hops",
              "hop_stage", "distinct_questions")


def main(argv):
    del argv
    common.main("depo", PRESETS, TASK_FLAGS, "experiments.depo")


if __name__ == "__main__":
    app.run(main)
