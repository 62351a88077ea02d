"""Pretrained checkpoints in Hugging Face format: a local directory -> ``Params`` (and back), with the tokenizer.

    params = sleepjax.pretrained.load("/ckpt/Qwen3.5-2B", window=2000, sleep_n=4, sleep_layers=(7, 21))
    params = sleepjax.pretrained.load("/ckpt/Qwen3-1.7B", insert_gdn=6, window=512)  # the paper's Ouro recipe
    sleepjax.pretrained.save(params, "/out/finetuned", source="/ckpt/Qwen3.5-2B", dtype="bfloat16")

Families (``FAMILIES``, by config.json's ``model_type``):
* ``qwen3_5_text`` / ``qwen3_5``: Qwen3.5 dense text models (``Qwen3_5ForCausalLM``, and the text tower of a
  ``Qwen3_5ForConditionalGeneration`` checkpoint: vision and multi-token-prediction weights are skipped). GDN layers
  (grouped value heads, gated output norm) and gated full attention (q/k norm, partial RoPE, output gate); norms
  scale by 1 + w except the GDN output norm.
* ``qwen3``: Qwen3 dense (attention only). ``insert_gdn=K`` adds K fresh GDN layers without an MLP, evenly spaced
  between the pretrained layers (which stay untouched); their output projections start at zero, so the model's
  logits equal the original's until training moves them.
* ``jet_nemotron``: Jet-Nemotron (NVlabs; remote code, ``JetNemotronForCausalLM``): a Qwen2-style stack whose
  ``layer_types`` are "jet" (JetBlock: sleepjax's "jet" layer kind), "attn" (full attention with q/k/v biases) and
  "swa" (the same attention, each query seeing the last ``efficient_attention_config.swa.window_size`` keys:
  sleepjax's "swa" kind, within sleepjax's window as every attention layer is); tied or untied embeddings.
* ``ouro``: Ouro (ByteDance's looped LM; remote code, ``OuroForCausalLM``): attention-only layers (no biases, no
  q/k norm, full RoPE) with four norms each (sleepjax's ``sandwich_norm_layers``: the mixer and MLP outputs are
  normalised too), the whole stack looped ``total_ut_steps`` times with the final norm closing every loop
  (``loop_steps``). Its logits are those of the last loop, Ouro's default exit; the early-exit gate is read and
  dropped (sleepjax trains and scores the last loop; ``save`` writes the ``sleepjax`` format, without it).
* ``sleepjax``: what ``save`` writes for a model no Hugging Face class describes (e.g. Qwen3 + inserted GDN): the
  same tensor names, and the ``ModelConfig`` in config.json (less the runtime fields: dtype, remat, backends).

Nothing is fetched from the network. Attention layers attend within sleepjax's window (``window`` override;
default: the checkpoint's ``max_position_embeddings``, or the window ``save`` recorded): with one window and N = 1
the model is the original one. Weights are read with ``safetensors`` (float32 params; bf16 checkpoints are
upcast) and transposed to sleepjax's [in, out] layout.

``save`` writes a directory transformers loads (for the Hugging Face families) and records in config.json's
``sleepjax`` block what a Hugging Face config cannot hold (window, sleep_n, sleep_layers, eviction, ...), which
``load`` restores; with ``source`` (the checkpoint it came from) it keeps that checkpoint's
``max_position_embeddings`` and token ids and copies its tokenizer and generation config. ``sleepjax/export.py``
turns a training run directory into such a directory.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from sleepjax.config import ATTENTION_KINDS, ModelConfig
from sleepjax.model import Params, init_block

SKIPPED_PREFIXES = ("model.visual.", "mtp.")  # vision tower, multi-token prediction: not part of the text model


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the message names the file, key or tensor."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {str(path)!r} is not a directory")
    if not config_file.exists():
        raise CheckpointError(f"{config_file} is missing: a Hugging Face checkpoint directory needs config.json")
    return json.loads(config_file.read_text())


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or a sharded index)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.exists():
                raise CheckpointError(f"{shard.name}, listed in {index.name}, is missing from {path}")
        return files
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


class _Tensors:
    """Lazy access to a checkpoint's tensors by name, each checked for its expected shape."""

    def __init__(self, path: Path, prefix: str):
        import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy so safetensors can read bf16 tensors)

        self.files, self.prefix, self.used = _tensor_files(path), prefix, set()
        self._handles: dict[Path, Any] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        from safetensors import safe_open

        full = self.prefix + name if not name.startswith("lm_head") else name
        if full not in self.files:
            raise CheckpointError(f"tensor {full!r} is missing from the checkpoint")
        file = self.files[full]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="numpy").__enter__()
        value = np.asarray(self._handles[file].get_tensor(full)).astype(np.float32)
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"tensor {full!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.used.add(full)
        return value

    def unused(self) -> list[str]:
        return sorted(n for n in self.files if n not in self.used and not n.startswith(SKIPPED_PREFIXES))


# ---------------------------------------------------------------------------------------------------------------
# Families: config.json -> ModelConfig fields, and the tensor names of each block


def _need(cfg: dict, key: str, where: str):
    if cfg.get(key) is None:
        raise CheckpointError(f"config.json ({where}) lacks {key!r} (missing or null): refusing to guess a shape")
    return cfg[key]


def _rope_parameters(cfg: dict, default_fraction: float) -> tuple[float, float]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    fraction = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", default_fraction))
    return float(theta), float(fraction)


def _common_fields(cfg: dict, where: str, default_fraction: float) -> dict:
    if cfg.get("attention_bias", False):
        raise CheckpointError("config.json: attention_bias=true is not supported (sleepjax attention has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    head_dim = int(_need(cfg, "head_dim", where))
    theta, fraction = _rope_parameters(cfg, default_fraction)
    rope_dim = int(head_dim * fraction)
    return dict(
        vocab_size=int(_need(cfg, "vocab_size", where)), d_model=int(_need(cfg, "hidden_size", where)),
        attn_heads=int(_need(cfg, "num_attention_heads", where)),
        attn_kv_heads=int(_need(cfg, "num_key_value_heads", where)), attn_head_dim=head_dim,
        mlp_dim=int(_need(cfg, "intermediate_size", where)), rope_theta=theta,
        rope_dim=None if rope_dim == head_dim else rope_dim, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qk_norm=True, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        window=int(cfg.get("max_position_embeddings", 2048)))


def _qwen3_5_fields(cfg: dict) -> tuple[dict, str]:
    """(ModelConfig fields, tensor-name prefix) of a Qwen3.5 config (CausalLM or ConditionalGeneration)."""
    prefix = "model."
    text = cfg
    if cfg.get("model_type") == "qwen3_5":
        text = _need(cfg, "text_config", "qwen3_5")
        prefix = "model.language_model."
    fields = _common_fields(text, "text_config" if text is not cfg else "qwen3_5_text", 0.25)
    # The top-level key decides tying for a ConditionalGeneration checkpoint (it is the model's own config).
    fields["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                       for i in range(int(_need(text, "num_hidden_layers", "text_config")))]
    kinds = {"linear_attention": "gdn", "full_attention": "attn"}
    if any(t not in kinds for t in layer_types):
        raise CheckpointError(f"config.json: layer_types must hold only {tuple(kinds)}, got {sorted(set(layer_types))}")
    fields.update(
        layers=tuple(kinds[t] for t in layer_types), gdn_heads=int(_need(text, "linear_num_key_heads", "text")),
        gdn_value_heads=int(_need(text, "linear_num_value_heads", "text")),
        gdn_key_dim=int(_need(text, "linear_key_head_dim", "text")),
        gdn_value_dim=int(_need(text, "linear_value_head_dim", "text")),
        conv_size=int(text.get("linear_conv_kernel_dim", 4)), attn_output_gate=True, norm_weight_offset=1.0)
    return fields, prefix


def _qwen3_fields(cfg: dict) -> tuple[dict, str]:
    if cfg.get("use_sliding_window", False) or "sliding_attention" in (cfg.get("layer_types") or []):
        raise CheckpointError("config.json: Qwen3 sliding-window layers are not supported")
    fields = _common_fields(cfg, "qwen3", 1.0)
    fields["layers"] = ("attn",) * int(_need(cfg, "num_hidden_layers", "qwen3"))
    return fields, "model."


def _jet_nemotron_fields(cfg: dict) -> tuple[dict, str]:
    """Jet-Nemotron's config.json: Qwen2-style attention (q/k/v biases, no q/k norm, full RoPE, head_dim = hidden /
    heads unless given) and ``efficient_attention_config`` for its "jet" and "swa" layers."""
    where = "jet_nemotron"
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    d, heads = int(_need(cfg, "hidden_size", where)), int(_need(cfg, "num_attention_heads", where))
    theta, fraction = _rope_parameters(cfg, 1.0)
    if fraction != 1.0:
        raise CheckpointError(f"config.json: partial_rotary_factor {fraction} is not supported for jet_nemotron")
    layer_types = _need(cfg, "layer_types", where)
    if isinstance(layer_types, str):  # the config class evaluates a string; a literal list is all we accept
        try:
            layer_types = ast.literal_eval(layer_types)
        except (ValueError, SyntaxError) as e:
            raise CheckpointError(f"config.json: layer_types {layer_types!r} is not a list literal") from e
    if not isinstance(layer_types, (list, tuple)) or any(t not in ("jet", "attn", "swa") for t in layer_types):
        raise CheckpointError(f"config.json: layer_types must be a list of 'jet', 'attn', 'swa', got {layer_types!r}")
    if "num_hidden_layers" in cfg and int(cfg["num_hidden_layers"]) != len(layer_types):
        raise CheckpointError(f"config.json: num_hidden_layers={cfg['num_hidden_layers']} but layer_types lists "
                              f"{len(layer_types)} layers")
    fields = dict(
        vocab_size=int(_need(cfg, "vocab_size", where)), d_model=d, layers=tuple(layer_types), attn_heads=heads,
        attn_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        attn_head_dim=int(cfg.get("head_dim") or d // heads), mlp_dim=int(_need(cfg, "intermediate_size", where)),
        rope_theta=theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), qk_norm=False, attn_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        window=int(cfg.get("max_position_embeddings", 2048)))
    extra = cfg.get("efficient_attention_config") or {}
    if "jet" in layer_types:
        jet = _need(extra, "jet", "efficient_attention_config")
        head_dim, expand = int(_need(jet, "head_dim", "jet")), float(_need(jet, "expand_v", "jet"))
        value_dim = round(head_dim * expand)
        if not math.isclose(head_dim * expand, value_dim, rel_tol=1e-5):
            raise CheckpointError(f"config.json: jet expand_v={expand} times head_dim={head_dim} is no integer")
        fields.update(jet_heads=int(_need(jet, "num_heads", "jet")), jet_key_dim=head_dim, jet_value_dim=value_dim,
                      jet_conv_size=int(jet.get("conv_size", 4)),
                      jet_conv_reduction=int(jet.get("dconv_generator_reduction", 8)),
                      jet_norm_eps=float(jet.get("norm_eps", 1e-5)))
    if "swa" in layer_types:
        fields["swa_window"] = int(_need(_need(extra, "swa", "efficient_attention_config"), "window_size", "swa"))
    return fields, "model."


def _ouro_fields(cfg: dict) -> tuple[dict, str]:
    """Ouro's config.json: Qwen2-style attention without biases or q/k norm (head_dim = hidden / heads unless given),
    four norms per layer and ``total_ut_steps`` loops of the stack."""
    if cfg.get("use_sliding_window", False) or "sliding_attention" in (cfg.get("layer_types") or []):
        raise CheckpointError("config.json: Ouro sliding-window layers are not supported")
    d, heads = int(_need(cfg, "hidden_size", "ouro")), int(_need(cfg, "num_attention_heads", "ouro"))
    fields = _common_fields({**cfg, "head_dim": cfg.get("head_dim") or d // heads}, "ouro", 1.0)
    layers = int(_need(cfg, "num_hidden_layers", "ouro"))
    loops = cfg.get("total_ut_steps", 4)
    if not isinstance(loops, int) or loops < 1:
        raise CheckpointError(f"config.json: total_ut_steps must be an int >= 1, got {loops!r}")
    fields.update(layers=("attn",) * layers, qk_norm=False, sandwich_norm_layers=tuple(range(layers)),
                  loop_steps=loops)
    return fields, "model."


def _sleepjax_fields(cfg: dict) -> tuple[dict, str]:
    saved = dict(_need(cfg, "sleepjax_config", "sleepjax"))
    for key in ("layers", "sleep_layers", "mlp_free_layers", "sandwich_norm_layers"):
        if isinstance(saved.get(key), list):
            saved[key] = tuple(saved[key])
    return saved, "model."


FAMILIES: dict[str, Callable[[dict], tuple[dict, str]]] = {
    "qwen3_5_text": _qwen3_5_fields, "qwen3_5": _qwen3_5_fields, "qwen3": _qwen3_fields,
    "jet_nemotron": _jet_nemotron_fields, "ouro": _ouro_fields, "sleepjax": _sleepjax_fields,
}
# Tensors a family's checkpoints hold that sleepjax reads and drops (see the module docstring).
_DROPPED = {"ouro": ("early_exit_gate.weight", "early_exit_gate.bias")}


# Block tensors: (sleepjax key path, Hugging Face name, how the HF [out, in] tensor maps to ours). Shapes are ours.
def _attention_names(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    d, H, Hkv, D = cfg.d_model, cfg.attn_heads, cfg.attn_kv_heads, cfg.attn_head_dim
    names = [(("wk",), "self_attn.k_proj.weight", (d, Hkv * D)), (("wv",), "self_attn.v_proj.weight", (d, Hkv * D)),
             (("wo",), "self_attn.o_proj.weight", (H * D, d))]
    if cfg.qk_norm:
        names += [(("q_norm",), "self_attn.q_norm.weight", (D,)), (("k_norm",), "self_attn.k_norm.weight", (D,))]
    if cfg.attn_bias:
        names += [(("bq",), "self_attn.q_proj.bias", (H * D,)), (("bk",), "self_attn.k_proj.bias", (Hkv * D,)),
                  (("bv",), "self_attn.v_proj.bias", (Hkv * D,))]
    return names


def _jet_names(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    """A JetBlock (Jet-Nemotron's names; the generator's W2 rows are channel-major, tap innermost, as ours)."""
    d, H, dk, dv = cfg.d_model, cfg.jet_heads, cfg.jet_key_dim, cfg.jet_value_dim
    C, K, r = H * dv, cfg.jet_conv_size, cfg.jet_generator_dim
    gen = "self_attn.dynamic_conv1d.kernel_generator."
    return [(("wq",), "self_attn.q_proj.weight", (d, H * dk)), (("wk",), "self_attn.k_proj.weight", (d, H * dk)),
            (("wv",), "self_attn.v_proj.weight", (d, C)), (("w_b",), "self_attn.b_proj.weight", (d, H)),
            (("w_a",), "self_attn.a_proj.weight", (d, H)), (("a_log",), "self_attn.A_log", (H,)),
            (("dt_bias",), "self_attn.dt_bias", (H,)), (("conv_w1",), gen + "w1.weight", (d, r)),
            (("conv_w2",), gen + "w2.weight", (r, C * K)), (("conv_b2",), gen + "w2.bias", (C * K,)),
            (("w_gate",), "self_attn.g_proj.weight", (d, C)), (("o_norm",), "self_attn.o_norm.weight", (dv,)),
            (("wo",), "self_attn.o_proj.weight", (C, d))]


def _gdn_names(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    d, hv, dv = cfg.d_model, cfg.gdn_value_heads, cfg.gdn_value_dim
    channels = 2 * cfg.gdn_heads * cfg.gdn_key_dim + hv * dv
    return [(("w_qkv",), "linear_attn.in_proj_qkv.weight", (d, channels)),
            (("w_gate",), "linear_attn.in_proj_z.weight", (d, hv * dv)),
            (("w_b",), "linear_attn.in_proj_b.weight", (d, hv)), (("w_a",), "linear_attn.in_proj_a.weight", (d, hv)),
            (("a_log",), "linear_attn.A_log", (hv,)), (("dt_bias",), "linear_attn.dt_bias", (hv,)),
            (("o_norm",), "linear_attn.norm.weight", (dv,)), (("wo",), "linear_attn.out_proj.weight", (hv * dv, d))]


def _mlp_names(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, tuple[int, ...]]]:
    d, f = cfg.d_model, cfg.mlp_dim
    return [(("norm2",), "post_attention_layernorm.weight", (d,)),
            (("mlp", "w_gate"), "mlp.gate_proj.weight", (d, f)), (("mlp", "w_up"), "mlp.up_proj.weight", (d, f)),
            (("mlp", "w_down"), "mlp.down_proj.weight", (f, d))]


def _hf_shape(ours: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(ours))


def _block_names(cfg: ModelConfig, layer: int):
    names = [(("norm1",), "input_layernorm.weight", (cfg.d_model,))]
    kind = cfg.layers[layer]
    names += (_attention_names(cfg) if kind in ATTENTION_KINDS else _jet_names(cfg) if kind == "jet"
              else _gdn_names(cfg))
    names += _mlp_names(cfg) if cfg.has_mlp(layer) else []
    if cfg.has_sandwich_norm(layer):  # Ouro's names: the norms of the attention output and of the MLP output
        names.append((("mixer_out_norm",), "input_layernorm_2.weight", (cfg.d_model,)))
        if cfg.has_mlp(layer):
            names.append((("mlp_out_norm",), "post_attention_layernorm_2.weight", (cfg.d_model,)))
    return names


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _read_block(tensors: _Tensors, cfg: ModelConfig, layer: int, hf_layer: int) -> dict:
    block: dict = {}
    base = f"layers.{hf_layer}."
    for path, name, shape in _block_names(cfg, layer):
        value = tensors.get(base + name, _hf_shape(shape))
        _set(block, path, value.T if value.ndim == 2 else value)
    if cfg.layers[layer] == "gdn":
        channels = block["w_qkv"].shape[1]
        block["conv"] = tensors.get(base + "linear_attn.conv1d.weight", (channels, 1, cfg.conv_size))[:, 0, :].T
    if cfg.layers[layer] in ATTENTION_KINDS:
        H, D = cfg.attn_heads, cfg.attn_head_dim
        width = 2 * D if cfg.attn_output_gate else D
        q = tensors.get(base + "self_attn.q_proj.weight", (H * width, cfg.d_model)).reshape(H, width, cfg.d_model)
        block["wq"] = q[:, :D].reshape(H * D, cfg.d_model).T
        if cfg.attn_output_gate:  # rows of head h: [query_h; gate_h]
            block["wq_gate"] = q[:, D:].reshape(H * D, cfg.d_model).T
    return block


# ---------------------------------------------------------------------------------------------------------------
# Public API


def inserted_positions(num_pretrained: int, count: int) -> tuple[int, ...]:
    """Where ``count`` inserted GDN layers go among ``num_pretrained`` layers: evenly spaced, each after pretrained
    layer round((j + 1) * num_pretrained / (count + 1)) - 1. Returns their indices in the combined stack."""
    after = [round((j + 1) * num_pretrained / (count + 1)) for j in range(count)]
    return tuple(a + j for j, a in enumerate(after))


INSERT_KINDS = ("gdn", "jet")


def _insert_layers(fields: dict, count: int, kind: str) -> None:
    """``count`` MLP-free layers of ``kind`` evenly spaced among the checkpoint's (``inserted_positions``); the
    per-layer index lists follow their layers. A kind the checkpoint lacks gets sizes from its attention: GDN
    key heads = KV heads and value heads = query heads of the head dim; JetBlock heads = query heads, key dim = the
    head dim, value dim twice it (Jet-Nemotron-4B's expand_v)."""
    num = len(fields["layers"])
    positions = inserted_positions(num, count)
    kept = [i for i in range(num + count) if i not in positions]  # kept[j]: the new index of checkpoint layer j
    kinds = [kind] * (num + count)
    for j, old in enumerate(fields["layers"]):
        kinds[kept[j]] = old
    for name in ("mlp_free_layers", "sandwich_norm_layers"):
        fields[name] = tuple(kept[j] for j in fields.get(name, ()))
    fields["mlp_free_layers"] += positions
    if kind not in fields["layers"]:
        heads, dim = fields["attn_heads"], fields["attn_head_dim"]
        if kind == "gdn":
            fields.update(gdn_heads=fields["attn_kv_heads"], gdn_value_heads=heads, gdn_key_dim=dim,
                          gdn_value_dim=dim)
        else:
            fields.update(jet_heads=heads, jet_key_dim=dim, jet_value_dim=2 * dim)
    fields["layers"] = tuple(kinds)


def _recorded_fields(hf: dict) -> dict:
    """The ModelConfig fields ``save`` recorded in config.json's ``sleepjax`` block (the sleep settings and whatever
    else the family's config cannot express); {} for a checkpoint sleepjax did not write."""
    block = hf.get(SLEEPJAX_KEY)
    if block is None:
        return {}
    recorded = block.get("model_config") if isinstance(block, dict) else None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"config.json: {SLEEPJAX_KEY!r} must be an object with a 'model_config' object, got "
                              f"{block!r}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise CheckpointError(f"config.json: {SLEEPJAX_KEY}.model_config holds fields this sleepjax does not know: "
                              f"{unknown} (written by a newer version?)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}


def load_config(path: str | os.PathLike, *, insert_gdn: int = 0, insert_kind: str = "gdn",
                **overrides: Any) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (plus ``insert_gdn`` MLP-free layers of ``insert_kind``, GDN or
    JetBlock, and any overrides). A checkpoint ``save`` wrote gets back the sleep settings it recorded (window,
    sleep_n, sleep_layers, eviction, ...); overrides still win."""
    path = Path(path)
    hf = _read_config(path)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json: model_type {model_type!r} is not supported; supported: {tuple(FAMILIES)}")
    fields, _ = FAMILIES[model_type](hf)
    fields.update(_recorded_fields(hf))
    if not isinstance(insert_gdn, int) or isinstance(insert_gdn, bool) or insert_gdn < 0:
        raise ValueError(f"insert_gdn must be an int >= 0, got {insert_gdn!r}")
    if insert_kind not in INSERT_KINDS:
        raise ValueError(f"insert_kind must be one of {INSERT_KINDS}, got {insert_kind!r}")
    if insert_gdn:
        _insert_layers(fields, insert_gdn, insert_kind)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
    return ModelConfig(**{**fields, **overrides})


def load(path: str | os.PathLike, *, insert_gdn: int = 0, insert_kind: str = "gdn", key=None,
         **overrides: Any) -> Params:
    """float32 ``Params`` from a local Hugging Face checkpoint directory (see the module docstring).

    insert_gdn: K fresh layers without an MLP, evenly spaced, of ``insert_kind`` ("gdn", or "jet": JetBlocks as in
    the paper's Ouro runs), initialised from ``key`` (default PRNGKey(0)) with their output projections at zero. overrides: ModelConfig fields (window, sleep_n, sleep_layers, dtype, remat, ...).
    Raises CheckpointError naming the missing file, unsupported model_type, missing or mis-shaped tensor.
    """
    path = Path(path)
    hf = _read_config(path)
    cfg = load_config(path, insert_gdn=insert_gdn, insert_kind=insert_kind, **overrides)
    _, prefix = FAMILIES[hf["model_type"]](hf)
    tensors = _Tensors(path, prefix)
    inserted = set(inserted_positions(len(cfg.layers) - insert_gdn, insert_gdn)) if insert_gdn else set()
    key = jax.random.PRNGKey(0) if key is None else key
    blocks, hf_layer = [], 0
    for i in range(len(cfg.layers)):
        if i in inserted:
            block = jax.tree_util.tree_map(np.asarray, init_block(cfg, i, jax.random.fold_in(key, i)))
            block["wo"] = np.zeros_like(block["wo"])  # the inserted layer adds nothing until trained
        else:
            block, hf_layer = _read_block(tensors, cfg, i, hf_layer), hf_layer + 1
        blocks.append(block)
    embed = tensors.get("embed_tokens.weight", (cfg.vocab_size, cfg.d_model))
    final_norm = tensors.get("norm.weight", (cfg.d_model,))
    unembed = None if cfg.tie_embeddings else tensors.get("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
    dropped = {prefix + name for name in _DROPPED.get(hf["model_type"], ())}
    unused = [n for n in tensors.unused() if not (cfg.tie_embeddings and n == "lm_head.weight") and n not in dropped]
    if unused:
        raise CheckpointError(f"the checkpoint holds tensors this model does not use: {unused[:5]}"
                              f"{' ...' if len(unused) > 5 else ''} (an unsupported variant?)")
    params = Params(embed=embed, layers=tuple(blocks), final_norm=final_norm, unembed=unembed, config=cfg)
    return jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)


def family_of(cfg: ModelConfig) -> str:
    """The format ``save`` writes: a Hugging Face family when one describes the model exactly, else "sleepjax"."""
    all_mlp = not cfg.mlp_free_layers
    if cfg.sandwich_norm_layers or cfg.loop_steps > 1:
        return "sleepjax"
    if (all_mlp and cfg.attn_bias and not cfg.qk_norm and not cfg.attn_output_gate and cfg.norm_weight_offset == 0.0
            and cfg.rope_dim is None and cfg.num_gdn_layers == 0):
        return "jet_nemotron"
    if cfg.attn_bias or any(kind in ("jet", "swa") for kind in cfg.layers):
        return "sleepjax"
    if all_mlp and cfg.qk_norm and cfg.attn_output_gate and cfg.norm_weight_offset == 1.0:
        return "qwen3_5_text"
    if (all_mlp and cfg.qk_norm and not cfg.attn_output_gate and cfg.norm_weight_offset == 0.0
            and cfg.num_gdn_layers == 0):
        return "qwen3"
    return "sleepjax"


def _expand_v(key_dim: int, value_dim: int) -> float:
    """Jet-Nemotron's expand_v for these head dims: the smallest float >= value/key whose product with key_dim
    truncates (``int``, as its code does) to value_dim."""
    expand = value_dim / key_dim
    while int(key_dim * expand) < value_dim:
        expand = math.nextafter(expand, math.inf)
    return expand


def _jet_nemotron_config(cfg: ModelConfig, max_positions: int) -> dict:
    out = {"model_type": "jet_nemotron", "architectures": ["JetNemotronForCausalLM"], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim, "num_hidden_layers": len(cfg.layers),
           "num_attention_heads": cfg.attn_heads, "num_key_value_heads": cfg.attn_kv_heads,
           "head_dim": cfg.attn_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_theta, "rope_scaling": None, "tie_word_embeddings": cfg.tie_embeddings,
           "max_position_embeddings": max_positions, "layer_types": list(cfg.layers)}
    extra = {}
    if "jet" in cfg.layers:
        extra["jet"] = {"mode": "chunk", "num_heads": cfg.jet_heads, "head_dim": cfg.jet_key_dim,
                        "expand_v": _expand_v(cfg.jet_key_dim, cfg.jet_value_dim), "conv_size": cfg.jet_conv_size,
                        "dconv_generator_reduction": cfg.jet_conv_reduction, "norm_eps": cfg.jet_norm_eps}
    if "swa" in cfg.layers:
        extra["swa"] = {"window_size": cfg.swa_window}
    return {**out, "efficient_attention_config": extra}


def _hf_config(cfg: ModelConfig, family: str, max_positions: int) -> dict:
    if family == "sleepjax":
        return {"model_type": "sleepjax", "architectures": ["SleepjaxHybrid"],
                "max_position_embeddings": max_positions,
                "sleepjax_config": json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items()
                                                          if k not in RUNTIME_FIELDS}))}
    if family == "jet_nemotron":
        return _jet_nemotron_config(cfg, max_positions)
    rotary = (cfg.rope_dim or cfg.attn_head_dim) / cfg.attn_head_dim
    out = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
           "num_hidden_layers": len(cfg.layers), "num_attention_heads": cfg.attn_heads,
           "num_key_value_heads": cfg.attn_kv_heads, "head_dim": cfg.attn_head_dim, "rms_norm_eps": cfg.norm_eps,
           "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
           "max_position_embeddings": max_positions,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": rotary}}
    if family == "qwen3":
        return {**out, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    return {**out, "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"],
            "layer_types": ["linear_attention" if k == "gdn" else "full_attention" for k in cfg.layers],
            "linear_num_key_heads": cfg.gdn_heads, "linear_num_value_heads": cfg.gdn_value_heads,
            "linear_key_head_dim": cfg.gdn_key_dim, "linear_value_head_dim": cfg.gdn_value_dim,
            "linear_conv_kernel_dim": cfg.conv_size}


# config.json's block of what sleepjax adds to a family's config (``save`` writes it, ``load_config`` reads it).
SLEEPJAX_KEY = "sleepjax"
# Always recorded: how the model sleeps (a Hugging Face config has no place for them).
SLEEP_FIELDS = ("window", "sleep_n", "sleep_layers", "eviction")
# Never recorded: how a run computes, not what the model is (activation dtype, rematerialisation, kernels).
RUNTIME_FIELDS = ("dtype", "remat", "gdn_backend", "attn_backend", "chunk_size")
# Keys of a source checkpoint's config.json kept when the model is written in another family's format.
SOURCE_KEYS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
# Keys of a source config.json never carried over: what ``save`` decides (the weights' dtype) or no longer holds.
_DROPPED_SOURCE_KEYS = ("torch_dtype", "dtype", "quantization_config", SLEEPJAX_KEY)
# Files ``save`` copies from a source checkpoint directory when they are there: the tokenizer (fast and slow
# formats, the chat template in either of transformers' files) and the generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
GENERATION_FILES = ("generation_config.json",)
SAVE_DTYPES = ("float32", "bfloat16")
INDEX_FILE = "model.safetensors.index.json"


def _sleepjax_block(cfg: ModelConfig, hf: dict, provenance: dict | None) -> dict:
    """What ``hf`` (a family's config) cannot say about ``cfg``: the sleep settings, and every other non-runtime
    field whose value the family's parser would not give back."""
    parsed, _ = FAMILIES[hf["model_type"]](hf)
    implied = {**dataclasses.asdict(ModelConfig()), **parsed}
    model = {k: v for k, v in dataclasses.asdict(cfg).items()
             if k not in RUNTIME_FIELDS and (k in SLEEP_FIELDS or implied.get(k) != v)}
    block = {"model_config": json.loads(json.dumps(model))}
    if provenance:
        block["provenance"] = json.loads(json.dumps(provenance))
    return block


def _source_config(source: Path) -> dict | None:
    """config.json of a source checkpoint directory, or None (no directory, or no config.json in it)."""
    file = source / "config.json" if source.is_dir() else None
    return json.loads(file.read_text()) if file is not None and file.exists() else None


def _merge_source(ours: dict, family: str, src: dict | None) -> dict:
    """``ours`` (the family's config) plus what the source's config.json says that sleepjax does not model
    (token ids, max_position_embeddings, auto_map, ...): the whole source config under ours when it is the same
    family and still describes the same model, else only ``SOURCE_KEYS`` (Qwen3.5's from its text_config)."""
    if src is None:
        return ours
    kept = {k: v for k, v in src.items() if k not in _DROPPED_SOURCE_KEYS}
    if src.get("model_type") == family and family != "sleepjax":
        merged = {**kept, **ours}
        try:
            same = FAMILIES[family](merged)[0] == FAMILIES[family](ours)[0]
        except CheckpointError:  # a source key the family's parser refuses (e.g. sliding windows turned on)
            same = False
        if same:
            return merged
    text = src.get("text_config") if src.get("model_type") == "qwen3_5" and isinstance(src.get("text_config"),
                                                                                       dict) else {}
    picked = {k: text.get(k, src.get(k)) for k in SOURCE_KEYS if text.get(k, src.get(k)) is not None}
    return {**picked, **ours}


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
    """The tensors in their order, cut into groups of at most ``max_shard_bytes`` (a larger tensor alone)."""
    if max_shard_bytes is None:
        return [tensors]
    groups, size = [{}], 0
    for name, value in tensors.items():
        if groups[-1] and size + value.nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = value
        size += value.nbytes
    return groups


def _write_tensors(tensors: dict[str, np.ndarray], path: Path, max_shard_bytes: int | None) -> list[str]:
    """Writes ``model.safetensors``, or (over ``max_shard_bytes``) ``model-0000i-of-0000n.safetensors`` and the index
    that transformers and ``load`` read; removes any model file of an earlier save there first. Returns the
    files written."""
    from safetensors.numpy import save_file

    for old in [path / "model.safetensors", path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if old.exists():
            old.unlink()
    groups = _shards(tensors, max_shard_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for name, group in zip(names, groups):
        save_file(group, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return [*names, INDEX_FILE]


def _copy_source_files(source: Path, path: Path) -> list[str]:
    """The tokenizer and generation files of ``source`` (a checkpoint directory, or a tokenizer.json file) copied
    into ``path``; returns their names."""
    import shutil

    if source.is_file():
        if source.name != "tokenizer.json":
            raise ValueError(f"source must be a checkpoint directory or a tokenizer.json file, got {str(source)!r}")
        files = [source]
    else:
        files = [source / name for name in TOKENIZER_FILES + GENERATION_FILES if (source / name).exists()]
    copied = []
    for file in files:
        if file.resolve() != (path / file.name).resolve():
            shutil.copyfile(file, path / file.name)
        copied.append(file.name)
    return copied


def save(params: Params, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
         dtype: str = "float32", max_shard_bytes: int | None = None, provenance: dict | None = None) -> str:
    """Writes ``config.json`` and the weights to ``path`` in the format of ``family_of`` (a Qwen3.5 model as
    ``Qwen3_5ForCausalLM``, text only); returns the family written.

    config.json gets a ``sleepjax`` block (``model_config``: window, sleep_n, sleep_layers, eviction and any other
    ModelConfig field the family's config cannot express; the runtime fields dtype, remat, backends and chunk_size
    are left out) that ``load`` restores, so a reloaded fine-tune sleeps as it was trained. Loading gives exactly
    ``params`` at float32 (at bfloat16: within its rounding).

    source: the checkpoint directory the model came from (a run's ``init_from``), or a tokenizer.json. Its
      tokenizer files (``TOKENIZER_FILES``) and generation_config.json are copied, and what its config.json says
      that sleepjax does not model is kept: ``max_position_embeddings`` (the model's, not the training window),
      token ids, ``auto_map``. Without one, max_position_embeddings is the window (the positions a model trained
      from scratch has seen: sleepjax counts RoPE positions from each window's start).
    dtype: the weights' dtype on disk, "float32" or "bfloat16" (half the size).
    max_shard_bytes: above this many bytes of tensors, write ``model-0000i-of-0000n.safetensors`` shards and
      ``model.safetensors.index.json`` (None: one file). Model files of an earlier save in ``path`` are removed.
    provenance: a JSON-able dict recorded as ``sleepjax.provenance`` (what ``export_run`` says it exported).
    """
    import ml_dtypes

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {SAVE_DTYPES}, got {dtype!r}")
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool)
                                        or max_shard_bytes < 1):
        raise ValueError(f"max_shard_bytes must be None or an int >= 1, got {max_shard_bytes!r}")
    cfg = params.config
    family = family_of(cfg)
    source = None if source is None else Path(source)
    if source is not None and not source.exists():
        raise ValueError(f"source {str(source)!r} does not exist (the checkpoint the model came from)")
    src = _source_config(source) if source is not None else None
    text_src = src.get("text_config") if src and src.get("model_type") == "qwen3_5" else src
    max_positions = int((text_src or {}).get("max_position_embeddings") or cfg.window)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    tensors = {"model.embed_tokens.weight": host.embed, "model.norm.weight": host.final_norm}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = host.unembed.T
    for i, block in enumerate(host.layers):
        base = f"model.layers.{i}."
        for key_path, name, _ in _block_names(cfg, i):
            value = _get(block, key_path)
            tensors[base + name] = value.T if value.ndim == 2 else value
        if cfg.layers[i] == "gdn":
            tensors[base + "linear_attn.conv1d.weight"] = block["conv"].T[:, None, :]
        elif cfg.layers[i] in ATTENTION_KINDS:
            H, D = cfg.attn_heads, cfg.attn_head_dim
            q = block["wq"].T.reshape(H, D, cfg.d_model)
            if cfg.attn_output_gate:
                q = np.concatenate([q, block["wq_gate"].T.reshape(H, D, cfg.d_model)], axis=1)
            tensors[base + "self_attn.q_proj.weight"] = q.reshape(-1, cfg.d_model)
    _write_tensors({k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}, path, max_shard_bytes)
    hf = _hf_config(cfg, family, max_positions)
    if family != "sleepjax":  # the sleepjax format holds the whole ModelConfig already
        hf[SLEEPJAX_KEY] = _sleepjax_block(cfg, hf, provenance)
    elif provenance:
        hf[SLEEPJAX_KEY] = {"model_config": {}, "provenance": json.loads(json.dumps(provenance))}
    hf = _merge_source(hf, family, src)
    hf["dtype"] = dtype
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    if source is not None:
        _copy_source_files(source, path)
    return family


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer (``tokenizer.json``, read with the ``tokenizers`` package)."""
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.exists():
        raise CheckpointError(f"{file} is missing: the tokenizer is read from tokenizer.json")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))
