"""posttrain command line: thin wrappers that parse, load a recipe and call into recipes/.

User errors (bad recipe keys, missing files, corrupt checkpoints) print one line and exit 2; pass --debug for the
traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from posttrain.errors import RunStopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="posttrain: SFT, RL with verifiable rewards, evaluation and scaling fits for LLMs.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
_DEBUG = {"on": False}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        import posttrain
        from posttrain.rundir import code_version

        v = code_version()
        out.print(f"posttrain {posttrain.__version__} (code {v['code']}{', uncommitted changes' if v['dirty'] else ''})",
                  markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    _DEBUG["on"] = debug


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file (see docs/recipes.md for every key).")],
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a key: --set "
                                                   "rl.lr=1e-4 (repeatable; KEY=null unsets an optional key).")
                    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete an existing run directory of this name first.")
                     ] = False,
) -> None:
    """Run a recipe. Re-running the same recipe resumes from its newest complete checkpoint."""
    from posttrain.config import load_recipe
    from posttrain.rundir import finished_summary

    cfg = load_recipe(recipe, set_ or [])
    summary = None if fresh else finished_summary(cfg.run_dir, cfg.model_dump(mode="json"))
    if summary is not None:  # before the heavy imports: re-printing a finished run takes no model loading
        err.print(f"{cfg.run_dir} already finished; showing its summary (use --fresh to run again)", markup=False)
    else:
        _quiet_libraries()
        from posttrain.runner import run as run_recipe

        summary = run_recipe(cfg, fresh=fresh, console=err)
    _print_summary(summary)


def summary_rows(evals: dict[str, dict]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(metric columns, rows) of the summary table: greedy accuracy, pass@k by k, maj@n; mean@n is left out (it is
    pass@1 by definition), so is reward_mean where every evaluation's equals its mean@n (a plain 0/1 verifier's
    reward), and an evaluation equal to the one before it (the same model evaluated again at a
    stage boundary, e.g. rl-step0 after sft) is merged into its row ("sft = rl-step0")."""
    import re

    def order(m: str) -> tuple[int, int, str]:
        k = re.fullmatch(r"eval/pass@(\d+)", m)
        return (1, int(k.group(1)), m) if k else ((0, 0, m) if m == "eval/greedy_acc" else (2, 0, m))

    plain_reward = all(v.get("eval/reward_mean") == v.get("eval/mean@n") for v in evals.values())
    hidden = {"eval/mean@n", *(["eval/reward_mean"] if plain_reward else [])}
    metrics = sorted({k for v in evals.values() for k in v if k not in hidden}, key=order)
    rows: list[tuple[str, list[str]]] = []
    previous: dict | None = None
    for tag, values in evals.items():
        cells = [f"{values[m]:.3f}" if m in values else "" for m in metrics]
        if previous is not None and values == previous and rows:
            rows[-1] = (f"{rows[-1][0]} = {tag}", rows[-1][1])
        else:
            rows.append((tag, cells))
        previous = values
    return [m.removeprefix("eval/") for m in metrics], rows


def _print_summary(summary: dict) -> None:
    table = Table(title=f"run {summary['run_dir']}: {summary['steps']} steps in {summary['elapsed_s']:.0f} s")
    columns, rows = summary_rows(summary.get("evals", {}))
    table.add_column("model")
    for m in columns:
        table.add_column(m, justify="right")
    for tag, cells in rows:
        table.add_row(escape(tag), *cells)
    # In a log (not a terminal) rich assumes 80 columns and would squeeze a wide table (eval suites) to "…"
    wide = Measurement.get(out, out.options.update(width=10_000), table).maximum
    (out if out.is_terminal or wide <= out.width else Console(file=out.file, width=wide)).print(table)
    out.print(f"final model: {summary['final_model']}", markup=False, highlight=False)
    out.print(f"metrics: {summary['run_dir']}/metrics.jsonl", markup=False, highlight=False)


@app.command()
def envs() -> None:
    """List the available environments."""
    from posttrain.envs.registry import describe_envs

    table = Table(title="environments")
    table.add_column("name")
    table.add_column("description")
    for name, doc in describe_envs():
        table.add_row(escape(name), escape(doc))
    out.print(table)


@app.command()
def docs(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write markdown here instead of stdout.")
                      ] = None,
) -> None:
    """Print the reference of every recipe key (generated from the typed config)."""
    from posttrain.docs import recipe_reference

    text = recipe_reference()
    if output:
        output.write_text(text)
    else:
        out.print(text, markup=False, highlight=False)


@app.command()
def fit(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (their metrics.jsonl are pooled).")],
    x: Annotated[str, typer.Option(help="Column for compute.")] = "compute/flops",
    y: Annotated[str, typer.Option(help="Column for performance.")] = "eval/pass@1",
    form: Annotated[str, typer.Option(help="sigmoid | power | saturating")] = "sigmoid",
    fit_until: Annotated[float | None, typer.Option(help="Fit on x <= this fraction of max x; report the "
                                                    "error on the rest.")] = None,
    exclude_frac: Annotated[float, typer.Option(help="Drop this early fraction as warm-up.")] = 0.0,
    out_png: Annotated[Path | None, typer.Option("--out", help="PNG path.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fit a compute -> performance curve with bootstrap CIs and an optional predictivity check."""
    from posttrain.commands.fit import run_fit

    run_fit(run_dirs, x=x, y=y, form=form, fit_until=fit_until, exclude_frac=exclude_frac, out=out_png,
            as_json=as_json)


_OVERWRITE = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file (without it, an "
                                           "existing file is an error; an --out that is an input file always is).")]


@app.command("distill-data")
def distill_data_(
    teacher: Annotated[str, typer.Argument(help="The teacher: a run directory (its final model and environment), a "
                                           "checkpoint, a local HF model directory or a preset name.")],
    output: Annotated[Path, typer.Option("--out", help="JSONL file to write (rows of prompt and completion, what "
                                         "sft.data_path reads), with FILE.meta.json beside it; written whole or "
                                         "not at all.")],
    env: Annotated[str | None, typer.Option(help="Environment (`posttrain envs`); default: the teacher run's.")
                   ] = None,
    env_arg: Annotated[list[str] | None, typer.Option("--env-arg", metavar="KEY=VALUE", help="Environment "
                                                      "argument (repeatable), e.g. --env-arg digits=3.")] = None,
    prompts: Annotated[int, typer.Option(help="Tasks of the train split to sample.")] = 1000,
    samples: Annotated[int, typer.Option(help="Teacher samples per task.")] = 4,
    keep: Annotated[int, typer.Option(help="Most distinct correct answers kept per task.")] = 1,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Keep answers the verifier rejected too (a "
                                              "model's own samples, for the opd_offline stage).")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (finite, >= 0).")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Generation budget.")] = 32,
    seed: Annotated[int | None, typer.Option(help="Task order and sampling seed (default: the run's).")] = None,
    chat_template: Annotated[bool | None, typer.Option("--chat-template/--no-chat-template",
                                                       help="Chat template (default: the run's).")] = None,
    overwrite: _OVERWRITE = False,
) -> None:
    """Sample a teacher on an environment's train split, keep its verified answers: SFT data for off-policy
    distillation (plus FILE.meta.json with the generation's FLOPs)."""
    _quiet_libraries()
    from posttrain.commands.distill_data import distill_data
    from posttrain.envs.scoring import shutdown_pool

    try:
        distill_data(teacher, output, env=env, env_args=env_arg or [], prompts=prompts, samples=samples, keep=keep,
                     temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, chat_template=chat_template,
                     console=err, keep_failed=keep_failed, overwrite=overwrite)
    finally:
        shutdown_pool()


data_app = typer.Typer(no_args_is_help=True, help="Data tools: diversity in gradient space (G-Vendi), diverse "
                       "subsets.")
app.add_typer(data_app, name="data")

_PROXY = Annotated[str, typer.Option("--model", help="Proxy model for the gradients: a preset (random init from "
                                     "--seed) or a local HF checkpoint directory, e.g. a run's final/.")]
_LAYERS = Annotated[int, typer.Option(help="Decoder layers, counted from the last, whose gradients are the "
                                      "features (plus the final norm); 1 to the proxy's number of layers.")]
_DIM = Annotated[int, typer.Option(help="Dimension of the seeded random projection (count sketch), at least 1.")]
_SEED = Annotated[int, typer.Option(help="Seed of the projection (and of a preset proxy's init).")]
_TEMPLATE = Annotated[bool, typer.Option("--chat-template/--no-chat-template", help="Render prompts with the "
                                         "proxy's chat template, as an SFT stage would.")]


@data_app.command("diversity")
def data_diversity(
    file: Annotated[Path, typer.Argument(help="SFT data: JSONL (or Parquet/CSV/a saved dataset) with prompt and "
                                         "completion columns, as sft.data_path reads.")],
    model: _PROXY = "tiny-3m", layers: _LAYERS = 1, dim: _DIM = 1024, seed: _SEED = 0,
    chat_template: _TEMPLATE = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """G-Vendi of an SFT set (the Vendi score of its examples' normalised gradient features under a proxy
    model), beside n-gram baselines (distinct-1/2/3, the Vendi score of character-bigram counts)."""
    _quiet_libraries()
    from posttrain.commands.diversity import diversity

    result = diversity(file, model=model, layers=layers, dim=dim, seed=seed, chat_template=chat_template,
                       console=err)
    if as_json:
        out.print(json.dumps(result, indent=1), markup=False, highlight=False)
        return
    out.print(f"G-Vendi: {result['g_vendi']:.4f}", markup=False, highlight=False)
    out.print(f"examples {result['examples']}, proxy {model} (last {layers} layer(s), sketch dim {dim}, seed "
              f"{seed}); baselines: distinct-1 {result['distinct_1']:.4f}, distinct-2 {result['distinct_2']:.4f}, "
              f"distinct-3 {result['distinct_3']:.4f}, bigram Vendi {result['ngram_vendi_2']:.4f}",
              markup=False, highlight=False)


@data_app.command("select")
def data_select(
    file: Annotated[Path, typer.Argument(help="SFT data (as for `data diversity`).")],
    output: Annotated[Path, typer.Option("--out", "-o", help="JSONL file for the selected rows (not FILE itself; "
                                         "written whole or not at all).")],
    n: Annotated[int, typer.Option("-n", help="Rows to select (at least 1).")],
    filter_: Annotated[str, typer.Option("--filter", help="Quality filter before selection: majority (the "
                                         "completion's answer is its prompt's most common one), verifier (--env "
                                         "scores it against the row's 'answer': a string, or for --env code its "
                                         "test cases, a list of [call, value] as --generate writes them), none."
                                         )] = "majority",
    env: Annotated[str | None, typer.Option(help="Environment whose verifier --filter verifier uses.")] = None,
    env_arg: Annotated[list[str] | None, typer.Option("--env-arg", metavar="KEY=VALUE",
                                                      help="Environment argument (repeatable).")] = None,
    clusters: Annotated[int | None, typer.Option(help="k-means clusters whose shortfall --generate fills "
                                                 "(at least 1; default: sqrt(n)).")] = None,
    generate: Annotated[int, typer.Option(help="Over-generate: draw up to this many new tasks from --env and add "
                                          "those that fall in clusters short of n / k rows.")] = 0,
    model: _PROXY = "tiny-3m", layers: _LAYERS = 1, dim: _DIM = 1024, seed: _SEED = 0,
    chat_template: _TEMPLATE = True, overwrite: _OVERWRITE = False,
) -> None:
    """A diverse subset: of the rows that pass the quality filter, n picked greedily for a high G-Vendi (each
    round the rows most in the gradient directions the subset lacks), optionally after filling the sparse
    gradient clusters with new tasks from the environment (Prismatic Synthesis). Prints its G-Vendi against a
    random subset of the file's rows of the same size."""
    _quiet_libraries()
    from posttrain.commands.diversity import select

    r = select(file, output, n=n, how=filter_, env=env, env_args=env_arg or [], model=model, layers=layers,
               dim=dim, seed=seed, chat_template=chat_template, clusters=clusters, generate=generate, console=err,
               overwrite=overwrite)
    made = f", {r['selected_generated']} of them generated ({r['generated']} kept of up to {generate} drawn)" \
        if generate else ""
    out.print(f"wrote {r['selected']} rows to {output} (of {r['passed_filter']} that pass --filter {filter_}, of "
              f"{r['rows']}){made}", markup=False, highlight=False)
    out.print(f"G-Vendi: {r['g_vendi_selected']:.4f} (a random subset of the same size: "
              f"{r['g_vendi_random_subset']:.4f}; all rows that pass: {r['g_vendi_all_passing']:.4f})",
              markup=False, highlight=False)


models_app = typer.Typer(no_args_is_help=True, help="Model tools: convert a GGUF file into a Hugging Face "
                         "checkpoint directory.")
app.add_typer(models_app, name="models")


@models_app.command("convert")
def models_convert(
    gguf_file: Annotated[Path, typer.Argument(help="A GGUF file (llama.cpp's format), quantized or not.")],
    out_dir: Annotated[Path, typer.Argument(help="New directory for the checkpoint (must not exist, or be empty); "
                                            "written whole or not at all.")],
) -> None:
    """Convert a GGUF file into a Hugging Face checkpoint directory that `model.path` and `posttrain eval` take:
    fp32 safetensors (quantized tensors dequantized: the rounded weights, not the original checkpoint's), the
    tokenizer with the file's chat template, the generation config, and conversion.json. Needs the `models`
    extra (gguf, accelerate)."""
    _quiet_libraries()
    from posttrain.commands.models import convert

    convert(gguf_file, out_dir, console=out)


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="A run directory (its final model, with the run's own eval "
                                          "protocol), a checkpoint (runs/x/checkpoints/step_N), a local HF model "
                                          "directory or a preset name.")],
    env: Annotated[str | None, typer.Option(help="Environment (`posttrain envs`); default: the run's.")] = None,
    env_arg: Annotated[list[str] | None, typer.Option("--env-arg", metavar="KEY=VALUE", help="Environment "
                                                      "argument (repeatable), e.g. --env-arg digits=3.")] = None,
    split: Annotated[str, typer.Option(help="train | eval")] = "eval",
    problems: Annotated[int | None, typer.Option(help="Number of problems (default: the run's, else 200).")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Samples per problem (default: the run's, else 16).")] = None,
    k: Annotated[str | None, typer.Option("--k", help="Comma-separated k values for pass@k.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (finite, >= 0).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling, in (0, 1].")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Generation budget.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (default: the run's).")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: the run's).")
                    ] = None,
    chat_template: Annotated[bool | None, typer.Option("--chat-template/--no-chat-template",
                                                       help="Chat template (default: the run's).")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="JSON path (default: RUN/eval/adhoc/, a new file "
                                                "each time).")] = None,
    overwrite: _OVERWRITE = False,
) -> None:
    """Evaluate a model: greedy accuracy, pass@k (unbiased), maj@n with bootstrap CIs."""
    ks = None
    if k is not None:
        try:
            ks = [int(x) for x in k.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--k {k!r}: expected comma-separated integers like 1,8,64") from None
    _quiet_libraries()
    from posttrain.commands.eval import run_eval

    run_eval(target, env=env, env_args=env_arg or [], split=split, problems=problems, n=n, ks=ks,
             temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, bf16=bf16,
             out=output, chat_template=chat_template, console=out, overwrite=overwrite)


@app.command()
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="Sweep TOML: a base recipe plus [axes] (see docs/sweeps.md).")],
    plan: Annotated[bool, typer.Option("--plan", help="Validate and list the points without running them.")
                    ] = False,
) -> None:
    """Run every point of a sweep as an ordinary run; finished points are skipped, unfinished ones resume."""
    _quiet_libraries()
    from posttrain.scaling.sweep import run_sweep

    path = run_sweep(sweep_file, only_plan=plan, console=err)
    out.print(f"results would be written to {path} (--plan runs nothing)" if plan else f"results: {path}",
              markup=False, highlight=False)


@app.command("iso-compute")
def iso_compute_(
    runs: Annotated[list[Path], typer.Argument(help="A sweep directory, or run directories.")],
    x: Annotated[str, typer.Option(help="Compute column.")] = "compute/flops",
    y: Annotated[str, typer.Option(help="Performance column.")] = "eval/pass@1",
    over: Annotated[str | None, typer.Option(help="Average configurations over this axis (e.g. seed).")] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Directory for iso_compute.csv/.png (default: the "
                                                "sweep directory, the run directory, else here).")] = None,
    mixed_machines: Annotated[bool, typer.Option("--mixed-machines", help="Compare runs of different precisions "
                                                 "or CPU kinds (refused by default: their numbers differ).")] = False,
) -> None:
    """Which configuration is best at equal compute: interpolates every run's curve at shared budgets."""
    from posttrain.scaling.sweep_results import ISO, iso_compute, iso_output_dir

    target = runs[0] if len(runs) == 1 and not (runs[0] / "metrics.jsonl").exists() else runs
    out_dir = output or iso_output_dir(target)
    table = iso_compute(target, x=x, y=y, over=over, out_dir=out_dir, allow_mixed=mixed_machines)
    view = Table(title=f"best {y} at equal {x}")
    for col in table[0] if table else ["budget"]:
        view.add_column(escape(str(col)))
    for row in table:
        view.add_row(*[f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row.values()])
    out.print(view)
    out.print(f"written: {out_dir / (ISO + '.csv')}, {out_dir / (ISO + '.png')}", markup=False, highlight=False)


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories; several are overlaid.")],
    output: Annotated[Path | None, typer.Option("--out", help="Directory for report.html and the PNGs "
                                                "(default: the first run dir).")] = None,
) -> None:
    """Write report.html and PNG plots: training curves over steps and compute, eval, pass@k vs k."""
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{d}: not a run directory (no metrics.jsonl)")
    from posttrain.report import write_report

    path = write_report(run_dirs, out_dir=output)
    out.print(f"report: {path}")


def main() -> None:
    try:
        app()
    except RunStopped as e:  # SIGTERM: the run checkpointed and stopped; 143 = 128 + SIGTERM, as a killed job
        err.print(escape(str(e)), highlight=False)
        sys.exit(143)
    except UserError as e:
        if _DEBUG["on"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; re-run the same command to resume from the newest checkpoint")
        sys.exit(130)


if __name__ == "__main__":
    main()
