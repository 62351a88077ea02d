"""GSM-Infinite: question first, statements consolidated window by window, then the answer.

    python -m experiments.gsm_infinite [--config=PRESET] [--config.<section>.<field>=VALUE ...] [--sweep_n=...]

The presets and example commands are in experiments/configs/gsm_infinite.py; --help lists the flags and every field.
"""

from experiments import common

if __name__ == "__main__":
    common.run("gsm_infinite")
