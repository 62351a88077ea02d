"""GSM-Infinite (clean-room generator): question first, statements consolidated window by window, then the
answer with no chain of thought; accuracy per op count.

    python -m experiments.gsm_infinite --sleep_n=8                       # tiny preset, CPU
    python -m experiments.gsm_infinite --sweep_n=1,4 --op_max=3           # CPU-scale comparison
    python -m experiments.gsm_infinite --config=paper --sweep_n=1,4,6 --mesh=data:8   # GPU/TPU host

The paper fine-tuned pretrained 1.4-2B hybrids; the ``paper`` presets train the 4-layer d=256 model from scratch
on the paper-length problems (2,000-3,300 tokens, window 2000).
"""

from absl import app, flags

from experiments import common

_TINY_TRAIN = dict(steps=1200, batch_size=32, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100, eval_every=200,
                   eval_size=512, checkpoint_every=200)
_PAPER_TRAIN = dict(steps=20_000, batch_size=256, muon_lr=1e-3, adam_lr=5e-5, warmup_steps=500, eval_every=1000,
                    eval_size=1600, checkpoint_every=1000)

PRESETS = {
    f"{scale}{suffix}": common.Preset(
        model="tiny" if scale == "tiny" else "paper", task=dict(preset=f"{scale}{suffix}"),
        train=_TINY_TRAIN if scale == "tiny" else _PAPER_TRAIN,
        description=f"{'CPU scale, d=64' if scale == 'tiny' else 'paper-length problems (stream layout), d=256'}, "
                    f"{(suffix[1:] or 'medium')} subset")
    for scale in ("tiny", "paper") for suffix in ("", "_hard", "_symbolic")
}
PRESETS["paper_sliding"] = common.Preset(
    model="paper", task=dict(preset="paper_sliding"), train=_PAPER_TRAIN, model_overrides=dict(eviction="sliding"),
    description="the paper's sliding-window setting: windows of 512, problems 4-6 windows long, sliding eviction "
                "(warm up with --eviction=hard first, or --warmup_eviction_steps)")

common.define_config_flag(PRESETS, "tiny")
flags.DEFINE_integer("op_min", None, "Smallest op count (operations needed for the answer).", lower_bound=1)
flags.DEFINE_integer("op_max", None, "Largest op count.", lower_bound=1)
flags.DEFINE_integer("context_len", None, "Tokens of the question + statements region (stream layout: of the "
                     "whole sequence).", lower_bound=1)
flags.DEFINE_enum("layout", None, ["evict", "stream"], "evict: the whole problem is consolidated and evicted before "
                  "the answer; stream (the paper's): windows fill from the start of the text, the answer's window "
                  "still holds the end of the problem.")
flags.DEFINE_integer("window", None, "Tokens per window (L); context_len must be a multiple.", lower_bound=1)
flags.DEFINE_string("tokenizer", None, "Tokenize the problems with this tokenizer.json (or a checkpoint directory "
                    "holding one) instead of the task's word vocabulary.")

TASK_FLAGS = ("op_min", "op_max", "context_len", "layout", "window", "tokenizer")


def main(argv):
    del argv
    common.main("gsm_infinite", PRESETS, TASK_FLAGS, "experiments.gsm_infinite")


if __name__ == "__main__":
    app.run(main)
