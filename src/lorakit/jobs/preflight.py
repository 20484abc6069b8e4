"""What `lorakit train` refuses before its first step, found without loading a model: the one
check `lorakit validate` and `lorakit train` both run.

`check_run` refuses an output folder a new run would write over (a model folder, an earlier
run: `train.checkpoint.find_resume`), a model path that does not exist, a dataset whose rows
the bad-row policy refuses (every row is read and converted, with the same row report as
training), and settings that need what the run does not have (exact match without eval data).
It returns warnings for settings that would change nothing.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import ConfigError
from lorakit.jobs.run_config import RunConfig, check_data


def check_run(run: RunConfig, resume: str | None = None, overwrite: bool = False) -> list[str]:
    """Raise what `train` would refuse before training; return warnings for settings that
    cannot take effect. `overwrite`: the run starts over in a folder an earlier run wrote."""
    from lorakit.train.checkpoint import find_resume
    from lorakit.train.rundir import earlier_run

    if overwrite and resume is not None:
        raise ConfigError("--overwrite starts the run over and --resume continues it; pass one")
    if overwrite:
        earlier_run(Path(run.output_dir))
    else:
        find_resume(Path(run.output_dir), resume)
    check_model_path(run)
    check_data(run)
    return check_settings(run)


def check_model_path(run: RunConfig) -> None:
    """A model.name_or_path that names a local folder must be one (hub ids and the built-in
    alias are left to loading)."""
    from lorakit.models.builtin import BUILTIN_ALIASES
    from lorakit.models.loading import resolve_model_path

    if run.model.name_or_path.lower() not in BUILTIN_ALIASES:
        resolve_model_path(run.model.name_or_path)


def check_settings(run: RunConfig) -> list[str]:
    """ConfigError for a setting that needs what the run lacks; warnings for those that would
    change nothing."""
    has_eval = run.eval_data_config() is not None
    if run.eval.exact_match and not has_eval:
        raise ConfigError(
            "eval.exact_match is set but the run has no eval data (eval.dataset, eval.datasets, "
            "or a built-in data.dataset's test split): set eval.dataset to a file of prompts and "
            "reference answers, or drop eval.exact_match"
        )
    warnings = []
    if not has_eval:
        keys = ["eval_max_batches"] + ([] if run.train.eval_prompts else ["eval_every"])
        unused = [f"train.{k}" for k in keys if _set(run.train, k)]
        unused += [f"eval.{k}" for k in ("limit", "split", "max_new_tokens") if _set(run.eval, k)]
        if unused:
            warnings.append(
                f"{', '.join(unused)} change nothing: the run has no eval data (eval.dataset or "
                "eval.datasets names some; a file data.dataset has none by default)"
            )
    if run.data.bad_rows == "error" and _set(run.data, "max_skipped_share"):
        warnings.append("data.max_skipped_share changes nothing unless data.bad_rows is skip")
    if not run.data.datasets and _set(run.data, "mix_seed"):
        warnings.append("data.mix_seed changes nothing without data.datasets")
    return warnings


def _set(section: object, key: str) -> bool:
    """Whether the config file (or an override) set this key."""
    return key in getattr(section, "model_fields_set", set())
