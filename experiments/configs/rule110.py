r"""Rule 110 (paper Fig. 2): label i = bit 0 of string i after t steps; each string fills one window.

    python -m experiments.rule110 --sleep_n=4 --config.task.t=8 --workdir=runs/r110
    python -m experiments.rule110 --sweep_n=1,2,4 --config.task.t=4             # CPU-scale comparison
    python -m experiments.rule110 --config=paper --sweep_n=1,2,3,4 --config.train.mesh=data:8   # a GPU/TPU host
"""

import ml_collections as mlc

from experiments.configs import common

PRESETS = {
    "tiny": "CPU scale: d=64, width 12, t=4",
    "paper": "paper Fig. 2: d=256, 4 layers, width 24, t=32, batch 512",
}


def get_config(arg=None):
    preset = common.preset(arg, PRESETS)
    config = mlc.ConfigDict()
    if preset == "tiny":
        config.model = common.model("tiny")
        config.task = common.task(width=12, strings=4, t=4, boundary="periodic")
        config.train = common.train(steps=1500, batch_size=64, muon_lr=0.02, adam_lr=3e-3, warmup_steps=100,
                                    eval_every=100, eval_size=1024, checkpoint_every=250)
    else:
        config.model = common.model("paper")
        config.task = common.task(width=24, strings=4, t=32, boundary="periodic")
        config.train = common.train(steps=20_000, batch_size=512, muon_lr=2e-3, adam_lr=5e-5, warmup_steps=500,
                                    eval_every=500, eval_size=4096, checkpoint_every=1000)
    return config
