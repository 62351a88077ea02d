"""Generate text with a trained sleepjax model: a training run's checkpoint or a Hugging Face checkpoint.

    python -m experiments.generate --run_dir=runs/depo/tiny_N4 --prompt="HOP1 e3 ANS"
    python -m experiments.generate --init_from=/ckpt/qwen3 --prompts_file=prompts.jsonl --output=out.jsonl \\
        --max_new_tokens=128 --temperature=0.7 --top_p=0.9 --seed=1

Prompts: ``--prompt`` (repeatable) and/or ``--prompts_file`` (JSONL, one object per line with a "prompt" field).
Each prompt's windows count from its own first token: the prompt is consumed window by window (full windows sleep,
N passes, and drop their KV cache), then one wake pass per new token, sleeping whenever a window fills
(``sleepjax.generate``). Output: one JSON line per prompt (``--output``, default stdout) with the prompt, the
completion text and the token ids. Text: a run's task (its ``prompt_ids(text)`` and ``eos_id`` when it defines
them, else its tokenizer or its word vocabulary, words split on spaces); a Hugging Face checkpoint's tokenizer.json. Generation stops at the end-of-sequence token (the checkpoint's
generation_config.json / config.json ``eos_token_id``, the tokenizer's, or the task's EOS; ``--eos_id=-1``: never).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("run_dir", None, "A training run's workdir (its config.json and checkpoints/): generate with its "
                    "checkpoint and its task's vocabulary or tokenizer.")
flags.DEFINE_integer("step", None, "With --run_dir: the checkpoint step (default: the latest).", lower_bound=0)
flags.DEFINE_string("init_from", None, "A Hugging Face checkpoint directory (config.json, model.safetensors, "
                    "tokenizer.json), read with sleepjax.pretrained.load.")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
flags.DEFINE_string("prompts_file", None, "A JSONL file: one object per line with a \"prompt\" field.")
flags.DEFINE_string("output", "-", "Where the JSONL results go ('-': stdout).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt (fewer if it ends at EOS).", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample from softmax(logits / temperature).", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens (0: all).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Sample only among the most likely tokens whose probability reaches top_p.",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed gives the same text).")
flags.DEFINE_integer("sleep_n", None, "N: sleep passes per full window (default: the checkpoint's).", lower_bound=1)
flags.DEFINE_integer("eos_id", None, "End-of-sequence id (default: the checkpoint's or the task's; -1: never stop).",
                     lower_bound=-1)
flags.DEFINE_integer("batch_size", 8, "Prompts generated together.", lower_bound=1)

_HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull", "-?")


class _Text:
    """Prompt text <-> token ids: a Hugging Face tokenizer, or a task's word vocabulary."""

    def __init__(self, *, tokenizer=None, task=None):
        self.tokenizer, self.task = tokenizer, task

    def encode(self, text: str) -> list[int]:
        if hasattr(self.task, "prompt_ids"):  # a task that says how a prompt is laid out as in training
            return [int(i) for i in self.task.prompt_ids(text)]
        if self.tokenizer is not None:
            return list(self.tokenizer.encode(text).ids)
        words = getattr(self.task, "tokenize", str.split)(text)
        unknown = [w for w in words if w not in self.task.vocab]
        if unknown:
            raise ValueError(f"prompt {text!r}: {unknown[0]!r} is not a word of the {self.task.name} vocabulary "
                             f"({' '.join(self.task.vocab[:12])} ...)")
        return [self.task.token_id(w) for w in words]

    def decode(self, ids) -> str:
        if self.tokenizer is not None and not hasattr(self.task, "prompt_ids"):
            return self.tokenizer.decode([int(i) for i in ids])
        return self.task.decode(ids)


def _eos_of_checkpoint(path: Path, tokenizer) -> int | None:
    from sleepjax.tasks.text_encoding import EOS_NAMES

    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int):
                return value
    return next((tokenizer.token_to_id(n) for n in EOS_NAMES if tokenizer.token_to_id(n) is not None), None)


def _load():
    """(params, _Text, default EOS id) from --run_dir or --init_from."""
    if bool(FLAGS.run_dir) == bool(FLAGS.init_from):
        raise ValueError("give exactly one of --run_dir (a training run) and --init_from (a Hugging Face checkpoint)")
    overrides = {} if FLAGS.sleep_n is None else {"sleep_n": FLAGS.sleep_n}
    if FLAGS.init_from:
        from sleepjax import pretrained

        path = Path(FLAGS.init_from)
        if not path.is_dir():
            raise ValueError(f"--init_from={path}: no such directory")
        tokenizer = pretrained.load_tokenizer(path)
        return pretrained.load(path, **overrides), _Text(tokenizer=tokenizer), _eos_of_checkpoint(path, tokenizer)
    from sleepjax import rundir
    from sleepjax.train import load_run

    path = Path(FLAGS.run_dir)
    if not (path / rundir.CONFIG).is_file():
        raise ValueError(f"--run_dir={path}: not a training run directory (no {rundir.CONFIG})")
    params, model_cfg, _, task = load_run(path, FLAGS.step)
    if overrides:
        params = params.replace(config=model_cfg.replace(**overrides))
    if hasattr(task, "prompt_ids"):  # the task lays the prompt out (BOS, chat template) and knows its EOS
        return params, _Text(task=task), getattr(task, "eos_id", None)
    tokenizer_path = getattr(task, "options", {}).get("tokenizer")
    if tokenizer_path:
        from sleepjax import pretrained

        tokenizer = pretrained.load_tokenizer(tokenizer_path)
        return params, _Text(tokenizer=tokenizer), _eos_of_checkpoint(Path(tokenizer_path), tokenizer)
    eos = task.token_id("EOS") if "EOS" in task.vocab else None
    return params, _Text(task=task), eos


def _prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        path = Path(FLAGS.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts_file={path}: no such file")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: needs a string \"prompt\" field")
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError("no prompts: give --prompt=TEXT (repeatable) or --prompts_file=FILE.jsonl")
    return prompts


def main(argv) -> None:
    del argv
    try:
        prompts = _prompts()
        params, text, eos = _load()
        if FLAGS.eos_id is not None:
            eos = None if FLAGS.eos_id < 0 else FLAGS.eos_id
        if eos is not None and not 0 <= eos < params.config.vocab_size:
            eos = None  # a tokenizer id the model cannot emit
        if FLAGS.top_p <= 0:
            raise ValueError(f"--top_p must be in (0, 1], got {FLAGS.top_p}")
        encoded = []
        for prompt in prompts:
            ids = text.encode(prompt)
            if not ids:
                raise ValueError(f"prompt {prompt!r} has no tokens")
            if max(ids) >= params.config.vocab_size:
                raise ValueError(f"prompt {prompt!r}: token id {max(ids)} is outside the model's vocabulary "
                                 f"({params.config.vocab_size})")
            encoded.append(ids)
        out = sys.stdout if FLAGS.output == "-" else open(FLAGS.output, "w")
    except (ValueError, OSError) as e:  # pretrained.CheckpointError is a ValueError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)
    import jax

    import sleepjax

    key = jax.random.PRNGKey(FLAGS.seed)
    try:
        for start in range(0, len(encoded), FLAGS.batch_size):
            batch = encoded[start:start + FLAGS.batch_size]
            # A short last batch is filled up with its first prompt (ignored): every batch reuses one compile.
            full = batch + [batch[0]] * (min(FLAGS.batch_size, len(encoded)) - len(batch))
            result = sleepjax.generate(params, full, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                                       top_k=FLAGS.top_k, top_p=FLAGS.top_p, eos_id=eos,
                                       key=jax.random.fold_in(key, start))
            for i, (ids, new) in enumerate(zip(batch, result.sequences())):
                stopped = eos is not None and bool(new) and new[-1] == eos
                out.write(json.dumps({"prompt": prompts[start + i], "completion": text.decode(
                    new[:-1] if stopped else new), "prompt_ids": ids, "completion_ids": new,
                    "stopped_at_eos": stopped}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()


def _parse(argv: list[str]) -> list[str]:
    if any(a in _HELP for a in argv[1:]):
        print(__doc__)
        print(FLAGS.module_help(sys.modules[__name__]).strip().split("\n", 1)[1])
        sys.exit(0)
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print("usage error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
