"""Adapters in and out: Hugging Face peft's LoRA / DoRA format, and inference from a saved adapter.

peft layout (what ``PeftModel.from_pretrained`` reads), for layer i and projection p:
``base_model.model.model.layers.<i>.<self_attn|mlp>.<p>.lora_A.weight [r, d_in]``,
``...lora_B.weight [d_out, r]`` and, for DoRA, ``...lora_magnitude_vector [d_out]``;
our arrays are their transposes (``y = x @ W``). Phi-3, whose checkpoints fuse q/k/v and gate/up, gets one
LoRA / DoRA per fused module (``qkv_proj``, ``gate_up_proj``). Mixture adapters have no peft
equivalent; they use comoe-jax's own safetensors layout (``checkpoint.save_adapters``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from comoe_jax.architectures import FUSED, fuse_for_checkpoint, projection_rows
from comoe_jax.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, load_adapters, read_safetensors, set_adapters
from comoe_jax.config import AdapterConfig, Config, LossConfig, config_from_dict, read_json
from comoe_jax.constants import ALIAS_HUB_IDS, TARGET_MODULES
from comoe_jax.errors import AdapterFormatError, ConfigError
from comoe_jax.generate import greedy_generate, stop_token_ids
from comoe_jax.loading import _hf_name, from_pretrained, hf_config, load_tokenizer, model_spec, resolve_model_path
from comoe_jax.model import ATTENTION_PROJECTIONS, flat_values, split_model, stacked_sources, unstack
from comoe_jax.paths import as_path, hub_id, replace

PEFT_PREFIX = "base_model.model."
# Beside a peft export: the base model as comoe-jax loaded it (a GGUF alias: peft's field names its hub model).
BASE_MODEL_FILE = "comoe_base_model.json"
SHARD_BYTES = 5 * 2**30  # a merged export's safetensors files at most (transformers' former default)
NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Our per-layer leaf -> (peft suffix, transpose?)
_PEFT_LEAVES = {"lora_a": ("lora_A.weight", True), "lora_b": ("lora_B.weight", True),
                "magnitude": ("lora_magnitude_vector", False)}
# peft adapter_config.json fields we cannot represent, with the value we need.
# (None and empty values always pass: older and newer peft versions write them for fields they lack.)
_PEFT_REQUIRED = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                  "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "modules_to_save": None,
                  "layer_replication": None, "alora_invocation_tokens": None, "exclude_modules": None,
                  "trainable_token_indices": None, "target_parameters": None, "use_bdlora": None,
                  "arrow_config": None, "kasa_config": None, "monteclora_config": None, "megatron_config": None}
# init_lora_weights that leave the base weights as they are; the others (pissa, olora, corda, loftq, lora_ga)
# move part of the base into the adapter, which peft repeats when it loads one
_PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _block(proj: str) -> str:
    return "self_attn" if proj in ATTENTION_PROJECTIONS else "mlp"


def export_peft(model, cfg: Config, directory: str | Path) -> Path:
    """Write a single-expert (lora / dora) model's adapters in peft's format.

    ``PeftModel.from_pretrained(LlamaForCausalLM(...), directory)`` then gives the same logits.
    Multi-host safe: every process joins the gather of the (possibly sharded) adapters, process 0 writes.
    """
    from safetensors.numpy import save

    a = cfg.adapter
    if a.num_experts != 1:
        raise ValueError(f"adapter.method={a.method} has {a.num_experts} experts: peft's format holds one LoRA / "
                         "DoRA per layer; mixtures export with comoe_jax.checkpoint.save_adapters")
    gathered = multihost_utils.process_allgather(flat_values(split_model(model)[1]), tiled=True)
    per_layer = unstack({k: np.asarray(v) for k, v in gathered.items()}, model.groups)
    norms = _untargeted_norms(model, a)
    directory = as_path(directory)
    if jax.process_index() != 0:
        return directory
    tensors = {}
    for name, value in per_layer.items():
        module, leaf = name.rsplit(".", 1)
        suffix, transpose = _PEFT_LEAVES[leaf]
        value = value[0]  # the single expert
        tensors[f"{PEFT_PREFIX}model.{module}.{suffix}"] = np.ascontiguousarray(value.T if transpose else value)
    layers = sorted(int(k.split(".")[1]) for k in per_layer if k.endswith(".lora_a"))
    targets, ranks = sorted(a.target_modules), {}
    if FUSED.get(model.spec.family):
        tensors, targets, ranks = _fused_peft(model, a, tensors, sorted(set(layers)), norms)
    peft_config = _PEFT_REQUIRED | {
        **base_model_fields(cfg.model.path), "task_type": "CAUSAL_LM", "r": a.rank,
        "lora_alpha": a.alpha, "lora_dropout": a.dropout, "target_modules": targets,
        "use_dora": a.method == "dora", "layers_to_transform": sorted(set(layers)), "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": ranks,
        "alpha_pattern": {module: a.alpha * rank / a.rank for module, rank in ranks.items()},  # same alpha / r
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))
    (directory / BASE_MODEL_FILE).write_text(json.dumps({"base_model": cfg.model.path}))
    return directory


def _fused_peft(model, a: AdapterConfig, tensors: dict, layers: list[int], norms: dict) -> tuple[dict, list, dict]:
    """peft's layout of a family whose checkpoints fuse projections (Phi-3: peft adapts ``qkv_proj`` and
    ``gate_up_proj``): the targeted parts' LoRAs as one LoRA on the fused module, A stacked by rank and B
    block-diagonal (exactly their sum); rank ``parts x r`` with alpha scaled alike (``rank_pattern``,
    ``alpha_pattern``). DoRA's magnitude of an untargeted part's rows is their norm in W0 (``norms``, per
    per-layer module name), so its scale is 1. -> (tensors, target_modules, rank_pattern)."""
    targets, ranks = set(a.target_modules), {}
    for fused, parts in FUSED[model.spec.family].items():
        present = [p for p in parts if p in targets]
        if not present:
            continue
        block, short = fused.split(".")
        targets = (targets - set(parts)) | {short}
        ranks[short] = len(present) * a.rank
        for layer in layers:
            prefix = f"{PEFT_PREFIX}model.layers.{layer}.{block}"
            lora_a, b, m = [], [], []
            for p in parts:
                block_b = np.zeros((projection_rows(model.spec, p), ranks[short]), np.float32)
                if p in present:
                    j = present.index(p) * a.rank
                    lora_a.append(tensors.pop(f"{prefix}.{p}.lora_A.weight"))  # [r, d_in]
                    block_b[:, j:j + a.rank] = tensors.pop(f"{prefix}.{p}.lora_B.weight")  # [d_out, r]
                b.append(block_b)
                if a.method == "dora":
                    m.append(tensors.pop(f"{prefix}.{p}.lora_magnitude_vector") if p in present
                             else norms[f"layers.{layer}.{block}.{p}"])
            out = f"{prefix}.{short}"
            tensors[out + ".lora_A.weight"] = np.ascontiguousarray(np.concatenate(lora_a, axis=0))
            tensors[out + ".lora_B.weight"] = np.ascontiguousarray(np.concatenate(b, axis=0))
            if m:
                tensors[out + ".lora_magnitude_vector"] = np.ascontiguousarray(np.concatenate(m).astype(np.float32))
    return tensors, sorted(targets), ranks


def _untargeted_norms(model, a: AdapterConfig) -> dict[str, np.ndarray]:
    """For DoRA on a family that fuses projections: the W0 column norms ``[d_out]`` of the fused parts that
    carry no adapter, per per-layer module name (every process joins the gather)."""
    parts = {p for fused in FUSED.get(model.spec.family, {}).values() for p in fused
             if a.method == "dora" and set(fused) & set(a.target_modules) and p not in a.target_modules}
    if not parts:
        return {}
    _, _, frozen = split_model(model)
    kernels = {k: v for k, v in flat_values(frozen).items() if k.endswith(".kernel") and k.rsplit(".", 2)[-2] in parts}
    gathered = multihost_utils.process_allgather(
        {k: jnp.linalg.norm(v.astype(jnp.float32), axis=-2) for k, v in kernels.items()}, tiled=True)
    return {k.removesuffix(".kernel"): np.asarray(v) for k, v in unstack(gathered, model.groups).items()}


def base_model_fields(path: str) -> dict:
    """peft's ``base_model_name_or_path`` and ``revision`` for ``model.path``: a hub id as its repository and
    revision, a local model as an absolute path (so ``AutoPeftModelForCausalLM`` finds it from any folder),
    the GGUF aliases as the hub models they were quantised from (the adapter was trained on the dequantised
    4-bit weights, as a QLoRA adapter is). Another GGUF file is recorded as itself, which transformers reads
    only with ``gguf_file=``: export such runs with ``comoe-export --format merged``."""
    hub = hub_id(path)
    if hub:
        return {"base_model_name_or_path": hub[0], "revision": hub[1]}
    if path in ALIAS_HUB_IDS:
        return {"base_model_name_or_path": ALIAS_HUB_IDS[path], "revision": None}
    if path == "random":
        return {"base_model_name_or_path": path, "revision": None}
    local = Path(path) if Path(path).exists() else resolve_model_path(path)
    return {"base_model_name_or_path": str(local.resolve()), "revision": None}


def recorded_base(directory: str | Path) -> str | None:
    """The base model an adapter folder records, as ``model.path`` takes it (comoe-jax's ``base_model``;
    peft's ``base_model_name_or_path`` with its ``revision``)."""
    meta = read_json(as_path(directory) / ADAPTER_CONFIG, AdapterFormatError)
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{as_path(directory) / ADAPTER_CONFIG}: expected a JSON object, got "
                                 f"{type(meta).__name__}")
    if meta.get("format") == FORMAT:
        return meta.get("base_model")
    ours = as_path(directory) / BASE_MODEL_FILE  # a peft folder comoe-jax wrote: the base exactly as trained
    if ours.exists():
        saved = read_json(ours, AdapterFormatError)
        if isinstance(saved, dict) and isinstance(saved.get("base_model"), str):
            return saved["base_model"]
    base, revision = meta.get("base_model_name_or_path"), meta.get("revision")
    return f"{base}@{revision}" if base and revision and hub_id(base) else base


def merged_tensors(model, adapter: AdapterConfig, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, array in ``dtype``) of the base model's frozen weights with a single-expert LoRA /
    DoRA folded in, layer by layer (the host holds one layer's weights at a time, and Phi-3's parts of one fused
    weight come together); merged in float32: LoRA ``W0 + s A B``; DoRA ``m * (W0 + s A B) / ||W0 + s A B||``
    (norm over the input axis)."""
    _, adapters, frozen = split_model(model)
    trained = unstack({k: np.asarray(v, np.float32) for k, v in flat_values(adapters).items()}, model.groups)
    scaling, out_dtype = adapter.alpha / adapter.rank, NUMPY_DTYPES[dtype]
    values = flat_values(frozen)

    def merged():
        for name, stacked, index in _layer_by_layer(values, model.groups):
            weight = np.asarray(values[stacked] if index is None else values[stacked][index], np.float32)
            module = name.removesuffix(".kernel")
            if name.endswith(".kernel") and module + ".lora_a" in trained:
                weight = weight + scaling * trained[module + ".lora_a"][0] @ trained[module + ".lora_b"][0]
                if adapter.method == "dora":
                    weight = weight * (trained[module + ".magnitude"][0] / np.linalg.norm(weight, axis=0))
            weight = weight.T if name.endswith(".kernel") else weight  # ours y = x @ W; torch's y = x @ W.T
            yield name, weight.astype(out_dtype)

    for name, weight in fuse_for_checkpoint(model.spec, merged()):  # Phi-3: q/k/v and gate/up as one tensor each
        yield _hf_name(name), np.ascontiguousarray(weight)


def _layer_by_layer(values: dict, groups: tuple[range, ...]) -> list[tuple[str, str, int | None]]:
    """(per-layer name, stacked name, index in the stack or None) of every weight: the layers' in layer order,
    a layer's weights together, after the weights outside the layers."""
    items = []
    for stacked in values:
        sources = stacked_sources(stacked, groups)
        items += [(name, stacked, j) for j, name in enumerate(sources)] if sources else [(stacked, stacked, None)]
    return sorted(items, key=lambda item: int(m[1]) if (m := re.match(r"layers\.(\d+)\.", item[0])) else -1)


def write_safetensors_shards(directory, tensors: Iterable[tuple[str, np.ndarray]],
                             shard_bytes: int | None = None) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json`` (as
    transformers' ``save_pretrained`` shards) when the tensors exceed ``shard_bytes``; returns the file names."""
    from safetensors.numpy import save

    directory, shard_bytes = as_path(directory), shard_bytes or SHARD_BYTES
    shards: list[list[str]] = []
    current: dict[str, np.ndarray] = {}

    def flush() -> None:
        (directory / f"part-{len(shards)}.safetensors").write_bytes(save(current, metadata={"format": "pt"}))
        shards.append(list(current))
        current.clear()

    total = 0
    for name, value in tensors:
        if current and sum(v.nbytes for v in current.values()) + value.nbytes > shard_bytes:
            flush()
        current[name], total = value, total + value.nbytes
    flush()
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, name in enumerate(names):
        replace(directory / f"part-{i}.safetensors", directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t: name for name, members in zip(names, shards) for t in members}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def export_merged(model, cfg: Config, directory: str | Path, dtype: str = "float32") -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) of a lora / dora run with its adapter
    merged into the weights, loadable by ``AutoModelForCausalLM.from_pretrained`` without peft; weights in
    ``dtype`` (float32 or bfloat16, merged in float32), sharded as transformers shards them."""
    a = cfg.adapter
    if a.method not in ("lora", "dora"):
        raise ConfigError(f"adapter.method={a.method}: only lora / dora runs merge into the base weights "
                          "(a routed mixture of experts has no single merged weight); export it with --format comoe")
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as local:  # transformers writes local files; the run may be on gs://
        config = hf_config(cfg.model)
        text = config.text_config if config.model_type == "gemma3" else config  # the text weights only
        text.dtype = dtype  # what the files hold: AutoModelForCausalLM(dtype="auto") loads them as they are
        text.save_pretrained(local)
        load_tokenizer(cfg.model.path).save_pretrained(local)
        base = resolve_model_path(cfg.model.path) if cfg.model.path != "random" else None
        if base is not None and (base / "generation_config.json").is_file():  # its end tokens (a chat model's)
            (Path(local) / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
        for file in Path(local).iterdir():
            (directory / file.name).write_bytes(file.read_bytes())
    write_safetensors_shards(directory, merged_tensors(model, a, dtype))
    return directory


def _peft_fields(path: Path, meta: dict, num_layers: int) -> AdapterConfig:
    targets = meta.get("target_modules")
    fused = sorted({t for t in (targets if isinstance(targets, list) else ()) if isinstance(t, str)}
                   & {f.split(".")[1] for layout in FUSED.values() for f in layout})
    if fused:
        raise AdapterFormatError(f"{path}: a peft adapter on {', '.join(fused)} (Phi-3's fused projections) cannot be "
                                 "read: comoe-jax keeps q/k/v and gate/up apart; use the comoe adapter folder the run "
                                 "wrote (<run>/adapter) or merge it (comoe-export --format merged)")
    for key, want in _PEFT_REQUIRED.items():
        value = meta.get(key)
        if value is not None and value != want and (value or want):
            raise AdapterFormatError(f"{path}: field {key!r} is {value!r}; comoe-jax reads only {want!r}")
    init = meta.get("init_lora_weights")
    if init is not None and not any(init is v or (isinstance(init, str) and init == v) for v in _PEFT_PLAIN_INITS):
        raise AdapterFormatError(f"{path}: field 'init_lora_weights' is {init!r}: that adapter is meant for a base "
                                 "model peft modified when it initialised it; comoe-jax adds adapters to the "
                                 "unmodified base, so convert it to a plain LoRA with peft first (save_pretrained(..., "
                                 "path_initial_model_for_weight_conversion=...)); plain inits: "
                                 f"{', '.join(map(str, _PEFT_PLAIN_INITS))}")
    if isinstance(targets, str) or not targets or any(t not in TARGET_MODULES for t in targets):
        raise AdapterFormatError(f"{path}: field 'target_modules' is {targets!r}; give a list of "
                                 f"{' '.join(TARGET_MODULES)}")
    layers = meta.get("layers_to_transform")
    layers = list(range(num_layers)) if layers is None else ([layers] if isinstance(layers, int) else layers)
    if (not isinstance(layers, list) or not layers or not all(isinstance(v, int) for v in layers)
            or layers != list(range(min(layers), max(layers) + 1)) or max(layers) >= num_layers):
        raise AdapterFormatError(f"{path}: field 'layers_to_transform' is {layers!r}; comoe-jax needs a contiguous "
                                 f"range of layers below {num_layers}")
    method = "dora" if meta.get("use_dora") else "lora"
    rank, alpha = _positive(path, meta, "r", int), _positive(path, meta, "lora_alpha", float)
    dropout = meta.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise AdapterFormatError(f"{path}: field 'lora_dropout' is {dropout!r}; expected a number in [0, 1)")
    return AdapterConfig(method=method, num_experts=1, top_k=1, rank=rank, alpha=alpha, dropout=float(dropout),
                         target_modules=tuple(targets), layers=f"{min(layers)}:{max(layers) + 1}")


def _positive(path: Path, meta: dict, key: str, kind: type):
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or kind(value) != value:
        raise AdapterFormatError(f"{path}: field {key!r} is {value!r}; expected a positive "
                                 f"{'integer' if kind is int else 'number'}")
    return kind(value)


def read_peft(directory: str | Path, num_layers: int) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """(AdapterConfig, per-layer arrays in our layout) from a peft LoRA / DoRA folder."""
    directory = as_path(directory)
    path = directory / ADAPTER_CONFIG
    meta = read_json(path, AdapterFormatError)
    adapter = _peft_fields(path, meta, num_layers)
    ours = {suffix: (leaf, transpose) for leaf, (suffix, transpose) in _PEFT_LEAVES.items()}
    per_layer = {}
    for key, value in read_safetensors(directory / ADAPTER_WEIGHTS, AdapterFormatError).items():
        module, _, suffix = key.removeprefix(PEFT_PREFIX + "model.").partition(".lora_")
        suffix = "lora_" + suffix
        if not key.startswith(PEFT_PREFIX) or suffix not in ours:
            raise AdapterFormatError(f"{directory / ADAPTER_WEIGHTS}: tensor {key!r} is not a LoRA / DoRA weight "
                                     "of a Llama projection")
        leaf, transpose = ours[suffix]
        per_layer[f"{module}.{leaf}"] = (value.T if transpose else value)[None].astype(np.float32)
    return adapter, per_layer


def adapter_format(directory: str | Path) -> str:
    """``'comoe'`` or ``'peft'``, from the folder's adapter_config.json."""
    path = as_path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist: not an adapter folder")
    meta = read_json(path, AdapterFormatError)
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") == FORMAT:
        return "comoe"
    if meta.get("peft_type") == "LORA":
        return "peft"
    raise AdapterFormatError(f"{path}: neither comoe-jax ('format': {FORMAT!r}) nor peft LoRA ('peft_type': 'LORA')")


def load_adapted(directory: str | Path, base: str | None = None, *, dtype: str = "float32", mesh=None, rules=None,
                 random_arch: dict | None = None, seed: int = 0):
    """Inference entry point: (model, tokenizer) with a saved adapter on its base model.

    ``directory`` is a comoe-jax adapter folder (``<run>/adapter``, any method) or a peft
    LoRA / DoRA folder; ``base`` overrides the base model path recorded there (``random_arch`` and ``seed``:
    the random base of a ``model.path=random`` run, as its config names them). The model
    runs without any training code: ``model(ids)``, ``comoe_jax.evaluate``,
    ``comoe_jax.generate.greedy_generate`` / :func:`generate_text`.
    """
    kind = adapter_format(directory)
    meta = read_json(as_path(directory) / ADAPTER_CONFIG, AdapterFormatError)
    base = base or recorded_base(directory)
    if not base:
        raise AdapterFormatError(f"{as_path(directory) / ADAPTER_CONFIG}: no base model recorded; pass base=")
    if kind == "comoe":
        where = str(as_path(directory) / ADAPTER_CONFIG)
        try:
            saved = config_from_dict({"adapter": meta["adapter"], "loss": meta["loss"]}, where)
        except KeyError as e:
            raise AdapterFormatError(f"{where}: missing field {e}") from None
        except ConfigError as e:
            raise AdapterFormatError(str(e)) from None
        adapter, loss = saved.adapter, saved.loss
        tensors, _ = load_adapters(directory)
    else:
        adapter, tensors = read_peft(directory, model_spec(base).num_layers)
        loss = LossConfig(contrastive_weight=0.0)
    model = from_pretrained(base, adapter=adapter, loss=loss, dtype=dtype, mesh=mesh, rules=rules,
                            random_arch=random_arch, seed=seed)
    set_adapters(model, tensors, source=directory, base=(recorded_base(directory), base))
    return model, load_tokenizer(base)


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """Greedy completions of text prompts with the KV cache (the prompt is not repeated)."""
    ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = greedy_generate(model, ids, max_new_tokens=max_new_tokens, eos_id=stop_token_ids(tokenizer), pad_id=pad,
                          batch_size=batch_size)
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]
