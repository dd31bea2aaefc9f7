"""Data: records, loaders, prompt templates, and the training batch stream."""

from comoe_jax.data.builtin import BUILTIN_TASKS, load_builtin
from comoe_jax.data.loaders import FORMATS, load_source, load_sources
from comoe_jax.data.pipeline import (
    BATCH_ARRAYS,
    TokenCounts,
    TrainStream,
    assign_rows,
    by_row,
    check_token_ids,
    check_tokenizer,
    data_fingerprint,
    encode,
    encode_pair,
    encode_segments,
    tokenize,
    tokenize_rows,
)
from comoe_jax.data.records import DataError, Example, multiple_choice
from comoe_jax.data.templates import TEMPLATES, render, render_cloze, render_segments

__all__ = [
    "BATCH_ARRAYS", "BUILTIN_TASKS", "DataError", "Example", "FORMATS", "TEMPLATES", "TokenCounts", "TrainStream",
    "assign_rows", "by_row", "check_token_ids", "check_tokenizer", "data_fingerprint", "encode", "encode_pair",
    "encode_segments", "load_builtin", "load_source", "load_sources",
    "multiple_choice", "render", "render_cloze", "render_segments", "tokenize", "tokenize_rows",
]
