"""Rule 110 (paper Fig. 2): label i = bit 0 of string i after t steps; each string fills one window.

    python -m experiments.rule110 --sleep_n=4 --t=8 --workdir=runs/r110
    python -m experiments.rule110 --sweep_n=1,2,4 --t=4            # CPU-scale comparison
    python -m experiments.rule110 --config=paper --t=32 --sweep_n=1,2,3,4 --mesh=data:8   # GPU/TPU host
"""

from absl import app, flags

from experiments import common

PRESETS = {
    "tiny": common.Preset(
        model="tiny", task=dict(width=12, strings=4, t=4),
        train=dict(steps=1500, batch_size=64, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100, eval_every=100,
                   eval_size=1024, checkpoint_every=250),
        description="CPU scale: d=64, width 12, t=4"),
    "paper": common.Preset(
        model="paper", task=dict(width=24, strings=4, t=32),
        train=dict(steps=20_000, batch_size=512, muon_lr=2e-3, adam_lr=5e-5, warmup_steps=500, eval_every=500,
                   eval_size=4096, checkpoint_every=1000),
        description="paper Fig. 2: d=256, 4 layers, width 24, batch 512"),
}

common.define_config_flag(PRESETS, "tiny")
flags.DEFINE_integer("t", None, "Rule 110 steps before the label is read.", lower_bound=0)
flags.DEFINE_integer("width", None, "Bits per string (= the window).", lower_bound=3)
flags.DEFINE_integer("strings", None, "Strings (windows) per example.", lower_bound=1)
flags.DEFINE_enum("boundary", None, ["periodic", "zero"], "Rule 110 boundary condition.")


def main(argv):
    del argv
    common.main("rule110", PRESETS, ("t", "width", "strings", "boundary"), "experiments.rule110")


if __name__ == "__main__":
    app.run(main)
