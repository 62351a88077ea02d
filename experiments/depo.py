"""Depo (paper Fig. 3): k-hop questions about a directed cycle whose edges were consolidated, then evicted.

    python -m experiments.depo [--config=PRESET] [--config.<section>.<field>=VALUE ...] [--sweep_n=...]

The presets and example commands are in experiments/configs/depo.py; --help lists the flags and every field.
"""

from experiments import common

if __name__ == "__main__":
    common.run("depo")
