"""Names shared by the config, the data pipeline, the adapters and the scripts (a leaf module: imports nothing).

Every allowed value of a string config key lives here, so validation, loaders and
the ``--help`` text read the same lists.
"""

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_PLACEMENTS = ("all", "low", "middle", "high")
ANCHOR_MODES = ("random", "all")
CONTRASTIVE_FORMS = ("gram", "reference")
EXPERT_COMPUTE = ("auto", "dense", "sparse")
SPARSE_FROM_EXPERTS = 64  # adapter.experts=auto: sparse experts from this n on (benchmarks/bench_step.py, CPU)
DTYPES = ("float32", "bfloat16")
SPLITS = ("train", "validation", "test")
EVAL_MODES = ("label", "loglik", "generate")
REDUCTIONS = ("auto", "exact", "xla")  # mesh.reduction: how the train step adds the devices' gradients
SOURCE_FORMATS = ("jsonl", "llm_adapters", "bigbench", "hf")
# hf:org/name[:subset][@split], when no such local folder exists (split: the hub's own name, e.g. train_sft, or a
# datasets slice such as train[:1000]; without it, the split asked for: train, validation or eval.split)
HUB_DATASET = r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$"
TEMPLATES = ("alpaca", "choice", "plain", "raw", "chat")
CHAT_ROLES = ("system", "user", "assistant")
CHAT_REPLIES = ("all", "last")  # data.chat_replies: which assistant replies of a conversation are trained on
MODEL_ALIASES = ("smollm2-135m", "gemma3-270m", "random")
# The hub models the GGUF aliases were quantised from: a peft export names them (peft cannot read a GGUF).
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
MESH_AXES = ("dcn", "data", "fsdp", "tensor")  # dcn: TPU slices (data-center network); the rest: within one
# Logical axis names that parameters and activations carry (mesh.rules maps them to MESH_AXES).
LOGICAL_AXES = ("batch", "length", "act_embed", "embed", "heads", "kv_heads", "mlp", "vocab", "expert", "rank", "norm",
                "layers")

# adapter.method -> what it is. Single-expert methods have no router; soft-routed ones weight every expert.
METHODS = {
    "comoe-lora": "top-k LoRA experts + the contrastive term (the paper)",
    "comoe-dora": "top-k DoRA experts + the contrastive term",
    "lora": "one LoRA expert, no router",
    "dora": "one DoRA expert (peft's numerics), no router",
    "mixlora": "top-k LoRA experts + the Switch/Mixtral load-balance loss (MixLoRA)",
    "moe-soft": "every LoRA expert weighted by the router softmax (soft-routed MoE-LoRA)",
    "omoe": "soft routing + Gram-Schmidt-orthogonalised expert outputs (OMoE)",
}
SINGLE_EXPERT_METHODS = ("lora", "dora")
SOFT_ROUTED_METHODS = ("moe-soft", "omoe")
DORA_METHODS = ("dora", "comoe-dora")

# Process exit codes of every command-line script (documented in the README).
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM / Ctrl-C after saving; rerun to resume
