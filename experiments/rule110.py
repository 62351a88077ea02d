"""Rule 110 (paper Fig. 2): label i = bit 0 of string i after t steps; each string fills one window.

    python -m experiments.rule110 [--config=PRESET] [--config.<section>.<field>=VALUE ...] [--sweep_n=...]

The presets and example commands are in experiments/configs/rule110.py; --help lists the flags and every field.
"""

from experiments import common

if __name__ == "__main__":
    common.run("rule110")
