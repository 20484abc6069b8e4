"""Whole jobs built from the parts, as the command line runs them: a fine-tuning run from a
YAML config (`run_config`, `finetune`), the quickstart, and a verified merge into a plain
Hugging Face folder (`merge`).

Import the module you need (`lorakit.jobs.finetune`, ...); this package imports nothing by
itself, so that the command line starts fast.
"""
