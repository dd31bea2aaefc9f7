"""lm-evaluation-harness backend: ``lm_eval`` scores a base model, or a comoe-jax run's adapters, with our JAX model.

    pip install lm_eval==0.4.13
    python -m comoe_jax.lm_eval_model --model comoe-jax \\
        --model_args path=smollm2-135m,adapter=runs/default --tasks arc_easy --batch_size 16

lm_eval 0.4.13 has no plugin mechanism for models (its CLI knows the models registered in its own
``lm_eval.models`` and whatever was imported before it runs), so this module registers ``comoe-jax``
when imported and ``python -m comoe_jax.lm_eval_model <lm_eval arguments>`` runs lm_eval's own CLI
after that import. From Python: ``import comoe_jax.lm_eval_model`` then
``lm_eval.simple_evaluate(model="comoe-jax", model_args={...}, ...)``. See docs/lm-eval.md.

Model args: ``path`` (``model.path`` as the loader takes it: a Hugging Face folder, a .gguf file,
``smollm2-135m``, ...; ``pretrained`` is an alias), ``adapter`` (a run folder ``runs/x``, loaded as
``evaluate.py --run`` loads it, or an adapter folder: ``<run>/adapter`` or a peft LoRA / DoRA folder),
``batch_size`` (lm_eval's ``--batch_size``), ``max_length``, ``dtype``, and ``num_devices`` / ``fsdp`` /
``tensor`` (the mesh; default: every device, data-parallel).

Tokenisation and windowing follow lm_eval's ``hf`` backend (``TemplateLM._encode_pair``: trailing
whitespace of the context moves onto the continuation, the pair is encoded whole and split at the
context's token count; rolling windows of ``max_length``), so numbers compare with ``--model hf``.
Scoring reuses :class:`comoe_jax.evaluate.Scorer` (requests packed into fixed-shape rows, the choices
of one question sharing their context, so a few compiles); generation is
:func:`comoe_jax.generate.greedy_generate` (greedy, KV cache).

Nothing in comoe_jax imports this module: lm_eval stays an optional dependency.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys

try:
    import lm_eval.models  # noqa: F401  (the built-in models: get_model imports them only into an empty registry)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
        resolve_max_length,
    )
except ImportError as e:  # lm_eval is an optional dependency
    raise ImportError(f"comoe_jax.lm_eval_model needs lm-evaluation-harness: pip install lm_eval==0.4.13 ({e})") \
        from e
import jax
from tqdm import tqdm

from comoe_jax import sharding as shd
from comoe_jax.cli import command
from comoe_jax.config import MeshConfig
from comoe_jax.errors import ConfigError
from comoe_jax.evaluate import DEFAULT_MAX_LEN, Scorer
from comoe_jax.generate import greedy_generate, stop_token_ids
from comoe_jax.loading import DTYPES, hf_config
from comoe_jax.paths import as_path

MODEL_NAME = "comoe-jax"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # as lm_eval's hf backend

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loading


def _mesh_config(base: MeshConfig, num_devices, fsdp, tensor) -> MeshConfig:
    if num_devices is not None:
        base.num_devices = _size("num_devices", num_devices)
        if base.num_devices > jax.device_count():
            raise ConfigError(f"model_args num_devices={num_devices}: only {jax.device_count()} devices are visible")
    if fsdp is not None:
        base.fsdp = _size("fsdp", fsdp)
    if tensor is not None:
        base.tensor = _size("tensor", tensor)
    if fsdp is not None or tensor is not None:
        base.data = -1
    return base


def load_for_eval(path: str | None, adapter: str | None, dtype: str | None = None, num_devices=None, fsdp=None,
                  tensor=None):
    """(model on its mesh, tokenizer, the base model's ``ModelConfig``) for evaluation.

    ``adapter`` a run folder (``config.json`` + ``adapter/``): the run's config and adapters, as
    ``evaluate.py --run`` loads them (``path`` / ``dtype`` / mesh args override the run's). An adapter
    folder (``<run>/adapter`` or peft LoRA / DoRA): :func:`comoe_jax.interop.load_adapted`. None: the
    bare base model ``path``.
    """
    from comoe_jax.checkpoint import load_run_model
    from comoe_jax.config import ModelConfig, load_run_config
    from comoe_jax.interop import load_adapted, recorded_base
    from comoe_jax.loading import from_pretrained, load_tokenizer

    dtype = None if dtype in (None, "", "auto") else str(dtype)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"model_args dtype={dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    if adapter:
        folder = as_path(adapter)
        if (folder / "config.json").is_file() and (folder / "adapter").is_dir():  # a run folder
            cfg = load_run_config(folder)
            if path:
                cfg.model.path = str(path)
            if dtype:
                cfg.model.dtype = dtype
            _mesh_config(cfg.mesh, num_devices, fsdp, tensor)
            return load_run_model(cfg, folder), load_tokenizer(cfg.model.path), cfg.model
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"adapter={adapter}: neither a comoe-jax run folder (config.json + adapter/) nor an "
                              "adapter folder (adapter_config.json)")
        base = str(path or recorded_base(folder) or "")
        mesh_cfg = _mesh_config(MeshConfig(), num_devices, fsdp, tensor)
        model, tokenizer = load_adapted(folder, base or None, dtype=dtype or "float32",
                                        mesh=shd.make_mesh(mesh_cfg), rules=shd.rules_dict(mesh_cfg.rules))
        return model, tokenizer, ModelConfig(path=base)
    if not path:
        raise ConfigError(f"--model {MODEL_NAME} needs model_args path=<model folder, .gguf, hub id or alias> (or "
                          "adapter=<run folder>)")
    mesh_cfg = _mesh_config(MeshConfig(), num_devices, fsdp, tensor)
    model = from_pretrained(str(path), dtype=dtype or "float32", mesh=shd.make_mesh(mesh_cfg),
                            rules=shd.rules_dict(mesh_cfg.rules))
    return model, load_tokenizer(str(path)), ModelConfig(path=str(path))


# --------------------------------------------------------------------------- scoring


class TokenScorer(Scorer):
    """:class:`Scorer`'s packed rows (a few compiles, the model's mesh) for lm_eval's requests: summed
    log-probability of a sequence's last tokens and whether greedy decoding gives them."""

    def scores(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """``rows``: (tokens, number n of final tokens to score), n < len(tokens). Returns (sum of log p of
        the last n tokens, whether each is the argmax) per row; rows with the same context (the choices of
        one question) share it."""
        contexts: dict[tuple, int] = {}
        where = []
        for tokens, n in rows:
            where.append((contexts.setdefault(tuple(tokens[:-n]), len(contexts)), tokens[-n:]))
        options: list[list[list[int]]] = [[] for _ in contexts]
        for row, (i, continuation) in enumerate(where):
            where[row] = (i, len(options[i]))
            options[i].append(continuation)
        scored = self.option_scores([list(c) for c in contexts], options)
        return [(float(scored[i][0][j]), bool(scored[i][1][j])) for i, j in where]


# --------------------------------------------------------------------------- the lm_eval model


def _where(name: str) -> str:
    """How a user set ``name``: batch_size may come from lm_eval's own --batch_size."""
    return "--batch_size (or model_args batch_size)" if name == "batch_size" else f"model_args {name}"


def _int(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_where(name)}={value!r}: expected an integer") from None


def _positive(name: str, value) -> int:
    number = _int(name, value)
    if number < 1:
        raise ConfigError(f"{_where(name)}={value!r}: expected a positive integer")
    return number


def _size(name: str, value) -> int:
    """A mesh size: positive, or -1 (all devices / the remaining ones)."""
    number = _int(name, value)
    if number != -1 and number < 1:
        raise ConfigError(f"model_args {name}={value!r}: expected a positive number of devices, or -1 for all")
    return number


def _merged_args(args: dict, additional: dict | None) -> dict:
    """model_args with lm_eval's own (``--batch_size``, ``--device``, ...) added; a key in both keeps the model_args
    value, with a warning (lm_eval's CLI always passes its --batch_size default)."""
    extra = {k: v for k, v in (additional or {}).items() if v is not None}
    for key in sorted(set(args) & set(extra)):
        if str(args[key]) != str(extra[key]):
            log.warning("%s: model_args %s=%s overrides lm_eval's --%s %s", MODEL_NAME, key, args[key], key,
                        extra[key])
    return {**extra, **args}


MODEL_ARGS = ("path", "pretrained", "adapter", "batch_size", "max_length", "dtype", "max_gen_toks", "num_devices",
              "fsdp", "tensor", "add_bos_token", "prefix_token_id")
LM_EVAL_ARGS = ("max_batch_size", "device", "trust_remote_code")  # lm_eval passes them; accepted and ignored


def _refuse_unknown(unused: dict) -> None:
    if not unused:
        return
    hints = []
    for key in sorted(unused):
        close = difflib.get_close_matches(key, MODEL_ARGS, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ConfigError(f"model_args: unknown key {', '.join(hints)}; {MODEL_NAME} takes {', '.join(MODEL_ARGS)} "
                      f"(and lm_eval's {', '.join(LM_EVAL_ARGS)}, ignored)")


class ComoeJaxLM(TemplateLM):
    """lm_eval ``LM`` over a comoe-jax model (see the module docstring for the model args)."""

    backend = "causal"

    def __init__(self, path: str | None = None, adapter: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, dtype: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 num_devices: int | None = None, fsdp: int | None = None, tensor: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, pretrained: str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, trust_remote_code=None, **unused):
        # max_batch_size / device: lm_eval passes them to every model; JAX runs on its default platform.
        # trust_remote_code (lm_eval's --trust_remote_code adds it): our loader runs no model code anyway.
        super().__init__()
        _refuse_unknown(unused)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            log.warning("%s: batch_size=%s not supported; using %d", MODEL_NAME, batch_size, DEFAULT_BATCH_SIZE)
            batch_size = DEFAULT_BATCH_SIZE
        batch_size, max_gen_toks = _positive("batch_size", batch_size), _positive("max_gen_toks", max_gen_toks)
        max_length = None if max_length in (None, "", "None") else _positive("max_length", max_length)
        self.path, self.adapter = path or pretrained, adapter
        self.model, self.tokenizer, model_cfg = load_for_eval(self.path, adapter, dtype, num_devices, fsdp, tensor)
        self.base = model_cfg.path
        self.dtype = dtype
        self.add_bos_token = add_bos_token
        if add_bos_token is not None:  # as the hf backend, which hands it to AutoTokenizer.from_pretrained
            if add_bos_token and self.tokenizer.bos_token is None:
                raise ConfigError(f"model_args add_bos_token=True: the tokenizer of {self.base} has no BOS token")
            self.tokenizer.add_bos_token = bool(add_bos_token)
        self.custom_prefix_token_id = None if prefix_token_id is None else _int("prefix_token_id", prefix_token_id)
        # as the hf backend: the model's context length (config.json, GGUF header), else the tokenizer's
        self._max_length = (_int("max_length", max_length) if max_length else
                            resolve_max_length(hf_config(model_cfg), self.tokenizer, default=DEFAULT_MAX_LEN))
        self._max_gen_toks = _int("max_gen_toks", max_gen_toks)
        tok = self.tokenizer
        self.pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        self.scorer = TokenScorer(self.model, self.pad_id, _int("batch_size", batch_size))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls(**_merged_args(lm_utils.simple_parse_args_string(arg_string), additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        return cls(**_merged_args(dict(arg_dict), additional_config))

    # ---- what lm_eval's TemplateLM needs (as its hf backend defines them)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """The hf backend's ``tok_encode``: the tokenizer's default special tokens unless told, none when the
        string already starts with the BOS text."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        options = {} if special is None else {"add_special_tokens": special}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **options)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(f"--apply_chat_template: the tokenizer of {self.base} has no chat template "
                              "(chat_template.jinja or tokenizer_config.json's chat_template); drop the flag")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_path": self.base, "adapter": self.adapter, "model_dtype": self.dtype or "float32",
                "max_length": self.max_length}

    # ---- log-likelihoods

    def _progress(self, total: int, desc: str, disable: bool):
        bar = tqdm(total=total, desc=desc, disable=disable)

        def advance(done: int, of: int) -> None:  # the scorer counts contexts (a question's choices share one)
            if bar.total != of:
                bar.total = of
                bar.refresh()
            bar.update(done)

        return bar, advance

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation) or None, context ids, continuation ids). As the hf backend:
        context + continuation cut from the left to ``max_length + 1`` tokens, the last one only predicted."""
        rows = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError(f"{MODEL_NAME}: empty context or continuation tokens")
            if len(continuation_enc) > self.max_length:
                raise ConfigError(f"model_args max_length={self.max_length}: a continuation of "
                                  f"{len(continuation_enc)} tokens does not fit; raise max_length")
            rows.append(((context_enc + continuation_enc)[-(self.max_length + 1):], len(continuation_enc)))
        bar, self.scorer.progress = self._progress(len(rows), "Running loglikelihood requests", disable_tqdm)
        try:
            out = self.scorer.scores(rows)
        finally:
            bar.close()
        for (request, _, _), answer in zip(requests, out):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over disjoint windows of ``max_length`` tokens (the first
        conditioned on ``prefix_token_id``), as the hf backend."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (KV cache), cut at the first ``until`` string or end token (the tokenizer's EOS
        and the model folder's generation config, as the ``hf`` backend's ``generate``); requests with the same
        generation kwargs are batched together."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="Running generate_until requests", disable=disable_tqdm)
        eot = self.eot_token_id
        eos_text = None if eot is None else self.tok_decode([eot], skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            if kwargs.get("do_sample"):
                log.warning("%s: do_sample=True requested; decoding greedily", MODEL_NAME)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_gen_toks
            if room <= 0:
                raise ConfigError(f"model_args max_length={self.max_length}: the task's max_gen_toks={max_gen_toks} "
                                  "leaves no room for the prompt; raise max_length (or lower max_gen_toks)")
            # an empty context starts from the prefix token (BOS or EOS), as loglikelihood's empty contexts do
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id]
                       for i in members]
            order = sorted(range(len(members)), key=lambda j: len(prompts[j]))  # similar lengths share a batch
            tokens = greedy_generate(self.model, [prompts[j] for j in order], max_new_tokens=max_gen_toks,
                                     eos_id=stop_token_ids(self.tokenizer) or -1,  # as generate() stops
                                     pad_id=self.pad_id, batch_size=self.batch_size,
                                     progress=lambda done, _total: bar.update(done))
            for j, seq in zip(order, tokens):
                text = postprocess_generated_text(self.tok_decode(seq), stop=until, think_end_token=None)
                out[members[j]] = text
                self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        bar.close()
        return out


if __name__ != "__main__" and MODEL_NAME not in model_registry:  # run as a script, the canonical import registers
    register_model(MODEL_NAME)(ComoeJaxLM)


@command
def main(argv: list[str] | None = None) -> int:
    """lm_eval's command line with ``comoe-jax`` registered: ``python -m comoe_jax.lm_eval_model <lm_eval args>``;
    comoe-jax's own errors (a bad path or adapter folder) print one line and exit 2."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    from comoe_jax.lm_eval_model import main as _main  # the importable module (it registers the model)

    sys.exit(_main())
