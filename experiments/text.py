"""Your own data (sleepjax/tasks/text.py): JSONL prompt/answer records or plain text, in a checkpoint's tokens.

    python -m experiments.text [--config=PRESET] [--config.<section>.<field>=VALUE ...] [--sweep_n=...]

The presets and example commands are in experiments/configs/text.py; --help lists the flags and every field.
"""

from experiments import common

if __name__ == "__main__":
    common.run("text")
