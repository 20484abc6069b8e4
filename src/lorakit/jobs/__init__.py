"""Whole jobs built from the parts, as the command line runs them: a fine-tuning run from a
YAML config (`run_config`, `finetune`), a base model beside base + adapters (`evaluation`), the
quickstart (`quickstart`), a verified merge into a plain Hugging Face folder (`merge`), memory
per rank before a run (`estimate`), and sweeps of a config's variants with their report
(`sweep`, `sweep_measure`, `sweep_report`).

Import the module you need (`lorakit.jobs.finetune`, ...); this package imports nothing by
itself, so that the command line starts fast.
"""
