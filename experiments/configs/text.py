r"""Your own data: JSONL prompt/answer records (the loss on the answers) or plain text (the loss on every token),
in the tokens of a checkpoint's tokenizer (sleepjax/tasks/text.py says how records become examples).

    # fine-tune a local checkpoint on your records with sleep (N = 4), evaluating on a file of its own
    python -m experiments.text --config=finetune --config.train.init_from=/ckpt/Qwen3-1.7B \
        --config.task.train_path=train.jsonl --config.task.eval_path=eval.jsonl --sleep_n=4
    # the checkpoint's ChatML chat template, a system message, other field names
    python -m experiments.text --config=finetune --config.train.init_from=/ckpt/Qwen3-1.7B \
        --config.task.train_path=qa.jsonl --config.task.chat_template=True --config.task.system="Be brief." \
        --config.task.prompt_field=question --config.task.answer_field=response
    # plain text, the first window of each 1024-token example consolidated (sleep) before the loss starts
    python -m experiments.text --config=finetune --config.train.init_from=/ckpt/Qwen3-1.7B \
        --config.task.train_path=book.txt --config.task.context_len=1024 --config.task.loss_from=512 --sweep_n=1,4
    # CPU scale, on the tiny test checkpoint (or without init_from: a d=64 model on UTF-8 bytes from scratch)
    python -m experiments.text --config=tiny --config.task.train_path=tests/fixtures/text_task/qa.jsonl \
        --config.task.eval_path=tests/fixtures/text_task/qa_eval.jsonl --config.train.eval_size=4 \
        --config.train.init_from=tests/fixtures/qwen3 --config.task.context_len=64 --config.train.steps=50

train.eval_size must not exceed the eval split (eval_path's records, or the held-out eval_fraction).

Sleep options are those of every launcher: --sleep_n / --sweep_n, --config.model.eviction=sliding,
--config.model.sleep_layers=START,STOP, --config.task.window (or --config.model.window) for L.
"""

import ml_collections as mlc
from ml_collections import config_dict

from experiments.configs import common

PRESETS = {
    "tiny": "CPU scale: examples of 128 tokens in windows of 64; a tiny checkpoint (--config.train.init_from) or a "
            "d=64 model on UTF-8 bytes from scratch; from-scratch learning rates",
    # needs --config.train.init_from=DIR, a local checkpoint (REQUIRED_CHECKPOINT)
    "finetune": "fine-tune a local checkpoint (--config.train.init_from=DIR): examples of 2048 tokens in windows "
                "of 512, bfloat16 activations, remat=both, parameters sharded (fsdp), fine-tuning rates (Muon 1e-3, "
                "AdamW 5e-5, the paper's)",
}
# What a fine-tuning preset's init_from holds until the command line gives a checkpoint directory.
REQUIRED_CHECKPOINT = {"finetune": "a local Hugging Face checkpoint directory: its model and tokenizer"}

# Every option of sleepjax.tasks.text.Text, in its order; train_path (None here) must come from the command line.
_TASK = dict(train_path=None, eval_path=None, eval_fraction=0.1, format="auto", prompt_field="prompt",
             answer_field="answer", difficulty_field=None, separator=" ", chat_template=False, system=None,
             text_split="auto", loss_from=0, tokenizer=None, context_len=128, window=64, too_long="error")
TASKS = {"tiny": _TASK, "finetune": dict(_TASK, context_len=2048, window=512)}


def _task(options: dict) -> mlc.ConfigDict:
    """The task section; a None option takes a string on the command line."""
    return mlc.ConfigDict({k: config_dict.placeholder(str) if v is None else v for k, v in options.items()},
                          sort_keys=False)


def get_config(arg=None):
    preset = common.preset(arg, PRESETS)
    config = mlc.ConfigDict()
    config.task = _task(TASKS[preset])
    if preset == "tiny":
        config.model = common.model("tiny")
        config.train = common.train(steps=300, batch_size=16, muon_lr=0.02, adam_lr=3e-3, warmup_steps=20,
                                    eval_every=100, eval_size=64, eval_batch_size=16, checkpoint_every=100)
    else:
        config.model = common.model("tiny", dtype="bfloat16", remat="both")  # the checkpoint's model is used
        config.train = common.train(init_from=common.required(REQUIRED_CHECKPOINT[preset]), steps=1000,
                                    batch_size=32, muon_lr=1e-3, adam_lr=5e-5, warmup_steps=50, eval_every=100,
                                    eval_size=256, eval_batch_size=32, checkpoint_every=100, mesh="fsdp:-1")
    return config
