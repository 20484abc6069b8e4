"""The data pipeline: files and built-in datasets → conversations → tokens with response-only
labels → batches (packed or length-grouped, split across ranks).

`formats` reads files and row formats, `tokenize` renders conversations through the chat
template and masks labels, `batches` plans and collates batches, `builtin` holds the shipped
datasets and exact-match scoring, `pipeline` joins them.
"""

from lorakit.data.builtin import BUILTIN_DATASETS, exact_match, exact_match_score, name_rate
from lorakit.data.pipeline import (
    DataConfig,
    Sample,
    TokenizedDataset,
    build_dataset,
    collate_batch,
    eval_examples,
    inspect_dataset,
    iter_batches,
    load_conversations,
    plan_epoch,
    prompt_template,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DataConfig",
    "Sample",
    "TokenizedDataset",
    "build_dataset",
    "collate_batch",
    "eval_examples",
    "exact_match",
    "exact_match_score",
    "inspect_dataset",
    "iter_batches",
    "load_conversations",
    "name_rate",
    "plan_epoch",
    "prompt_template",
]
