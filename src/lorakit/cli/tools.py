"""`lorakit eval`, `merge`, `inspect`, `serve`, `data inspect`, `data cache` and `init`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from lorakit.cli.generate import BaseArg
from lorakit.errors import ConfigError, LorakitError

PACKAGED_CONFIGS = Path(__file__).parents[1] / "configs"
OFFLINE_CONFIG = "smollm2-lora.yaml"


def register_tools(app: typer.Typer) -> None:
    """Add the tool commands (and the `data` group) to the app."""
    app.command(name="eval")(eval_command)
    app.command()(merge)
    app.command()(inspect)
    app.command()(serve)
    app.command()(init)
    data_app = typer.Typer(
        help="Look at datasets the way training sees them.", no_args_is_help=True
    )
    data_app.command(name="inspect")(data_inspect)
    data_app.command(name="cache")(data_cache)
    app.add_typer(data_app, name="data")


def eval_command(
    model: Annotated[str, typer.Option(help="Base model: folder, hub id or built-in alias.")] = (
        "smollm2-135m-instruct"
    ),
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter dir or name=dir; repeat to compare several.")
    ] = None,
    dataset: Annotated[str, typer.Option(help="Dataset file or built-in name.")] = "identity",
    split: Annotated[str, typer.Option(help="Split of a built-in dataset.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="First N rows only.")] = None,
    exact_match: Annotated[
        bool,
        typer.Option(
            help="Also generate answers and score exact match; prints the rows that missed "
            "(prompt, expected, got), and --output holds every answer."
        ),
    ] = False,
    facts: Annotated[
        bool,
        typer.Option(
            help="Also ask the built-in model's 16 held-out factual questions and count the "
            "answers that keep their key fact (Paris, 24 hours): what an adapter made the model "
            "forget; prints the answers that lost it."
        ),
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    precision: Annotated[str, typer.Option(help="fp32 or bf16.")] = "fp32",
    device: Annotated[str, typer.Option()] = "cpu",
    output: Annotated[Path | None, typer.Option(help="Also write the results as JSON.")] = None,
) -> None:
    """Loss, perplexity and exact match of the base model, and of base + each adapter."""
    from lorakit.adapter_specs import parse_adapters
    from lorakit.jobs.evaluation import default_eval_data, evaluate_models

    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: expected fp32 or bf16")
    rows = evaluate_models(
        model,
        parse_adapters(adapter or []),
        default_eval_data(dataset, split, limit),
        exact_match=exact_match,
        facts=facts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        precision=precision,
        device=device,
    )
    _print_table(rows, f"{dataset} ({split})")
    for row in rows:
        if "answer_rows" in row:
            _print_misses(row["model"], row["answer_rows"], output)
        if "fact_rows" in row:
            _print_lost_facts(row["model"], row["fact_rows"])
    if output is not None:
        output.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")


def _print_misses(model: str, answers: list[dict[str, Any]], output: Path | None) -> None:
    """The answers of one model that missed: prompt, expected, got (the first 20)."""
    from rich.console import Console
    from rich.table import Table

    misses = [a for a in answers if not a["match"]]
    console = Console(width=100)
    if not misses:
        console.print(f"{model}: every one of {len(answers)} answers matched")
        return
    shown = 20
    table = Table(title=f"{model}: {len(misses)} of {len(answers)} answers missed")
    for column in ("row", "prompt", "expected", "got"):
        table.add_column(column, overflow="fold")
    for miss in misses[:shown]:
        table.add_row(miss["where"], miss["prompt"], miss["expected"], miss["got"])
    console.print(table)
    if len(misses) > shown:
        where = f"all in {output}" if output else "--output FILE writes all answers"
        console.print(f"... and {len(misses) - shown} more ({where})")


def _print_lost_facts(model: str, answers: list[dict[str, Any]]) -> None:
    """The factual answers of one model that no longer state their key fact."""
    from rich.console import Console
    from rich.table import Table

    lost = [a for a in answers if not a["kept"]]
    console = Console(width=100)
    if not lost:
        console.print(f"{model}: every one of {len(answers)} factual answers kept its key fact")
        return
    table = Table(title=f"{model}: {len(lost)} of {len(answers)} factual answers lost their fact")
    for column in ("question", "key fact", "got"):
        table.add_column(column, overflow="fold")
    for a in lost:
        table.add_row(a["prompt"], " / ".join(a["facts"]), a["got"])
    console.print(table)


def _print_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    shares = ("exact_match", "name_rate", "facts_kept")
    columns = [c for c in ("eval_loss", "perplexity", *shares) if c in rows[0]]
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        cells = [f"{row[c]:.1%}" if c in shares else f"{row[c]:.4f}" for c in columns]
        table.add_row(row["model"], *cells)
    Console(width=100).print(table)


def merge(
    base: BaseArg,
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="Adapter directory.")],
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output folder (a plain Hugging Face model).")
    ],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    quantization: Annotated[
        str | None, typer.Option(help="The QLoRA base (nf4/fp4/int8): dequantized, then merged.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Largest accepted merged-vs-unmerged logit difference.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Merge ADAPTER into BASE and write OUT; refuses if the logits disagree or weights are NaN."""
    from lorakit.jobs.merge import merge_and_export

    report = merge_and_export(
        base,
        adapter,
        out,
        dtype=dtype,
        quantization=quantization,
        device=device,
        tolerance=tolerance,
        overwrite=overwrite,
    )
    for line in report.lines():
        typer.echo(line)


def inspect(
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER", help="Adapter directory.")],
    base: Annotated[
        str | None, typer.Option(help="Check that the adapter fits this base model.")
    ] = None,
    for_: Annotated[
        list[str] | None,
        typer.Option(
            "--for",
            help="What a consumer will refuse or compute differently: vllm, llama.cpp, peft, "
            "or all; repeat for several.",
        ),
    ] = None,
) -> None:
    """Show an adapter's config, rank, targets, parameters and size; with --base, check the fit;
    with --for, what vLLM / llama.cpp / older peft will do with it."""
    from lorakit.lora.adapters import WEIGHTS_NAME, check_adapter, read_adapter

    files = read_adapter(adapter)
    config = files.config
    modules = sorted({_module_of(k) for k in files.tensors})
    n_params = sum(t.numel() for t in files.tensors.values())
    size = sum(p.stat().st_size for p in adapter.iterdir() if p.is_file())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in files.tensors.values()})
    lines = [
        f"adapter:      {adapter}",
        f"base model:   {config.base_model_name_or_path or '(not recorded)'}",
        f"rank:         r={config.r}, lora_alpha={config.lora_alpha}, scaling="
        f"{config.lora_alpha / config.r:g}{', rsLoRA' if config.use_rslora else ''}"
        + (f", rank_pattern={config.rank_pattern}" if config.rank_pattern else ""),
        f"targets:      {config.target_modules} ({len(modules)} modules)",
        f"parameters adapted: {config.target_parameters or 'none'}"
        + (f"; file layout: {_layout_guess(config)}" if config.target_parameters else ""),
        f"parameters:   {n_params:,} in {len(files.tensors)} tensors ({', '.join(dtypes)})",
        f"size:         {size / 2**20:.2f} MiB ({WEIGHTS_NAME} and config)",
        f"dropout, bias: {config.lora_dropout}, {config.bias}",
        f"variant:      {'DoRA (use_dora)' if config.use_dora else 'LoRA'}, init_lora_weights="
        f"{config.init_lora_weights!r}"
        + (f", loftq_config={config.loftq_config}" if config.init_lora_weights == "loftq" else ""),
        f"modules_to_save: {config.modules_to_save or 'none'}",
        f"chat template: {'saved with the adapter' if files.chat_template else 'none'}",
    ]
    for line in lines:
        typer.echo(line)
    if for_:
        _consumer_report(adapter, files, for_)
    if base is None:
        return
    from lorakit.models import load_model

    model = load_model(base)
    check = check_adapter(model, files)  # raises AdapterError with the reason
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    typer.echo(
        f"fits {base}: {len(check.expected)} keys with matching shapes on "
        f"{len(check.target_names)} target modules; base vocab {vocab}"
    )
    if files.layout:
        typer.echo(f"expert tensors: {files.layout} layout")
    typer.echo(_coverage_line(model, files))


def _layout_guess(config) -> str:
    """The expert layout `peft_version` implies (the shapes decide once a base is given)."""
    from lorakit.lora.layouts import CURRENT, SWAPPED, writer_swapped

    return SWAPPED if writer_swapped(config.peft_version, False) else CURRENT


def _coverage_line(model, files) -> str:
    """The share of the decoder's weights the adapter adapts, with a warning when it leaves
    the experts of a mixture-of-experts model out."""
    from lorakit.lora import LoraModel
    from lorakit.lora.moe import coverage, expert_parameters

    moe = bool(expert_parameters(model))
    lora = LoraModel.from_pretrained(model, files.directory)
    done, total = coverage(lora.get_base_model())
    line = f"coverage:     {done:,} of {total:,} decoder weights adapted ({done / total:.0%})"
    if moe and not files.config.target_parameters:
        line += (
            "\nWARNING: this base is a mixture of experts and the adapter leaves its experts "
            "out; train with target_modules='all-linear' or set target_parameters"
        )
    return line


def _consumer_report(adapter: Path, files: Any, consumers: list[str]) -> None:
    """Print what each consumer will do with the adapter (lora.consumers' rules)."""
    from lorakit.lora.consumers import CONSUMERS, Facts, findings

    chosen = list(CONSUMERS) if "all" in consumers else consumers
    for name in chosen:
        if name not in CONSUMERS:
            raise ConfigError(f"--for {name!r}: expected one of {', '.join(CONSUMERS)} or all")
    raw = json.loads((adapter / "adapter_config.json").read_text())
    facts = Facts(files.config, sorted(files.tensors), raw)
    for name in chosen:
        found = findings(facts, name)
        typer.echo(f"for {name}: " + ("nothing refused" if not found else f"{len(found)} issue(s)"))
        for item in found:
            typer.echo(f"  {item.level}: {item.what}")
            typer.echo(f"    fix: {item.fix}")
            typer.echo(f"    source: {item.source}")


def _module_of(key: str) -> str:
    markers = (".lora_A", ".lora_B", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude")
    for marker in markers:
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def serve(
    base: BaseArg,
    adapter: Annotated[
        list[str] | None, typer.Option(help="Adapter dir or name=dir; repeat to serve several.")
    ] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="Require this bearer key (or set LORAKIT_API_KEY).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit in tokens.")] = None,
    adapters_root: Annotated[
        Path | None, typer.Option(help="Folder adapters may be loaded from at run time.")
    ] = None,
    allow_runtime_loading: Annotated[
        bool, typer.Option(help="Enable the load/unload endpoints (needs --adapters-root).")
    ] = False,
    allow_insecure_bind: Annotated[
        bool, typer.Option(help="Listen on a non-loopback address without an API key.")
    ] = False,
    served_model_name: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "float32",
    device: Annotated[str, typer.Option()] = "cpu",
    prepack: Annotated[
        bool,
        typer.Option(
            help="Keep a oneDNN-prepacked copy of fp32 CPU linear weights: faster decoding, "
            "as much memory again as those weights."
        ),
    ] = True,
) -> None:
    """Serve the base model and adapters with an OpenAI-compatible API (a request without
    `temperature` samples at 1.0, OpenAI's default; 0 is greedy)."""
    from lorakit.serve import serve_main

    try:
        serve_main(
            base,
            list(adapter or []),
            host=host,
            port=port,
            api_key=api_key,
            max_batch=max_batch,
            adapters_root=adapters_root,
            allow_runtime_loading=allow_runtime_loading,
            allow_insecure_bind=allow_insecure_bind,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            served_model_name=served_model_name,
            prepack=prepack,
        )
    except ImportError as missing:  # the serve extra is not installed
        raise LorakitError(str(missing)) from None


def data_inspect(
    config: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG",
            help="Run config (YAML); default: built-in model + identity.",
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(metavar="OVERRIDES", help="key.path=value overrides.")
    ] = None,
    n: Annotated[int, typer.Option("-n", min=0, help="Samples to show.")] = 3,
    batch_size: Annotated[int | None, typer.Option(help="Default: train.batch_size.")] = None,
) -> None:
    """Show samples as training sees them (trained tokens between ⟦ ⟧) and dataset statistics."""
    from lorakit.data.pipeline import inspect_dataset
    from lorakit.jobs.run_config import load_run_config
    from lorakit.models import load_tokenizer

    overrides = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        config, overrides = None, [str(config), *overrides]  # only overrides were given
    run = load_run_config(config, overrides)
    tokenizer = load_tokenizer(
        run.model.name_or_path, trust_remote_code=run.model.trust_remote_code
    )
    typer.echo(inspect_dataset(run.data, tokenizer, n, batch_size or run.train.batch_size))


def data_cache(
    clear: Annotated[
        bool, typer.Option("--clear", help="Remove the listed stores (all without --key).")
    ] = False,
    key: Annotated[
        list[str] | None, typer.Option("--key", help="Only this store (repeatable).")
    ] = None,
) -> None:
    """List the tokenized datasets kept between runs, or clear them."""
    from lorakit.data.store import cache_root, cache_table, clear_caches

    if clear:
        removed = clear_caches(key or None)
        typer.echo(f"removed {len(removed)} cached store(s) from {cache_root()}")
        return
    typer.echo(cache_table(key or None))


def init(
    directory: Annotated[
        Path, typer.Argument(metavar="DIRECTORY", help="Where to write the example configs.")
    ] = Path("configs"),
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Copy the ready-made run configs (built-in model, Llama, Qwen, GPT-2, Pythia) and sweep
    files (sweeps/) to DIRECTORY."""
    sources = sorted(PACKAGED_CONFIGS.glob("*.yaml")) + sorted(
        PACKAGED_CONFIGS.glob("sweeps/*.yaml")
    )
    if not sources:
        raise ConfigError(f"no packaged configs found in {PACKAGED_CONFIGS}")
    targets = [directory / s.relative_to(PACKAGED_CONFIGS) for s in sources]
    clashes = [str(t.relative_to(directory)) for t in targets if t.exists()]
    if clashes and not force:
        raise ConfigError(f"{directory} already has {', '.join(clashes)}; pass --force to replace")
    for source, target in zip(sources, targets, strict=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        typer.echo(f"wrote {target}")
    # the config that runs offline: the built-in model and the built-in identity data
    typer.echo(f"next: lorakit train {directory / OFFLINE_CONFIG}   (runs offline, on a CPU)")
