"""The ``mta-rewrite`` command line: a thin typer layer over the Python API (no logic here)."""

from __future__ import annotations

import re
from contextlib import contextmanager

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .capture import LIBRARY_LOGGERS, CaptureError
from .config import check_outputs

# click's UsageError (BadParameter, MissingParameter, NoSuchOption, …), whether typer vendors click
# (0.2x: typer._click) or imports it
# (a typer without it: nothing is caught, and typer prints its own box as before)
_UsageError = next((c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"),
                   type("_NoUsageError", (Exception,), {}))


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (a missing option, a value of the wrong type, an unknown command or option) as
    ``_fail``'s one line, with where the help is, instead of typer's framed box of several lines."""

    def parse_args(self, ctx, args):  # the app's own options (``mta-rewrite --bogus``)
        try:
            return super().parse_args(ctx, args)
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments at all: the help, as before
                raise
            self._usage_error(exc, ctx)

    def invoke(self, ctx):  # the command's name, its arguments and options
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            self._usage_error(exc, ctx)

    @staticmethod
    def _usage_error(exc, ctx) -> None:
        path = (exc.ctx or ctx).command_path
        message = exc.format_message().rstrip(".")  # ("No such command 'x'. Did you mean 'y'?")
        _fail(f"{message} See {path} --help" if message.endswith("?") else f"{message}; see {path} --help")


# markdown: the commands' docstrings are re-flowed to the terminal (typer's default, "rich", kept
# their line breaks, so `--help` broke descriptions off mid-sentence); `code` spans render as code.
app = typer.Typer(cls=_OneLineUsageErrors, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Rewrite the attention of PyTorch models into Multi-Token Attention (MTA).")

UNWRAPPED = 100_000  # (columns: wider than any line the commands print)


def _stdout_console() -> Console:
    """The console of the commands' results. Where stdout is not a terminal (a pipe, a file, a CI
    log) and ``COLUMNS`` is not set, rich lays out for 80 columns: it folded site names inside
    tables ("model.layers.0.self_att" over "n", a name users copy into plans) and paths across
    lines; there lines are as long as they need to be. On a terminal, its width."""
    import os
    import sys

    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(markup=False, width=UNWRAPPED if wide else None)


# Text is printed as written, never read as rich markup: paths, site names, reasons and library
# warnings may hold brackets ("[rank0]: …" lost its tag, a "[/]" raised MarkupError); what is
# styled is styled with Text.
console = _stdout_console()
err_console = Console(stderr=True, markup=False)


def _fail(message: str) -> None:
    """The one-line error of a user mistake, and exit code 2. The line is never wrapped (rich
    wraps at the terminal's width, 80 columns when stderr is not a terminal) and the message is
    not read as markup (a shape such as [B, 1, n] stays as written)."""
    lines = [line for line in str(message).splitlines() if line.strip()] or [""]
    # one line even where a library's message runs on (torch's C++ frames after its first line)
    err_console.print(Text.assemble(("error:", "red"), f" {lines[0]}"), soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


@contextmanager
def _reported_errors():
    """Around a command's work: what the user can mend becomes ``_fail``'s one line (a bad value,
    a file that is not what it should be, a model torch.export cannot capture), and so does memory
    exhausted by what was asked (an example or a prompt too long for this machine). Anything else
    is a defect of ours and keeps its traceback."""
    try:
        yield
    except (ValueError, TypeError, CaptureError, OSError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        _fail(f"out of memory: {str(exc).splitlines()[0][:300]} (ask for fewer tokens or a smaller batch)")


def _out_of_memory(exc: RuntimeError) -> bool:
    """torch's out-of-memory errors: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, and
    a size whose byte count overflows (tensors of 2**62 tokens)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or any(
        text in str(exc) for text in ("can't allocate memory", "Storage size calculation overflowed"))


def print_sites(sites, plan=None, title="attention sites") -> None:
    """The attention sites as a table (:func:`sites_table`) and, one line per reason below it, the
    softmaxes that are not attention: a mixture of experts has a router per layer, which filled
    half of the table with rows of no shape."""
    from .passes.sites import listed

    attention = [s for s in sites if s.is_attention]
    if attention or not sites:
        console.print(sites_table(attention, plan, title))
    reasons: dict[str, list[str]] = {}
    for s in sites:
        if not s.is_attention:
            reasons.setdefault(s.reason, []).append(s.name)
    for reason, names in reasons.items():
        console.print(f"not attention: {len(names)} softmax(es) ({listed(names)}): {reason}", highlight=False)


def _title(text: str) -> Text | str:
    """A table's title: where lines are as long as they need to be (:func:`_stdout_console`), on
    one line however long (a path in it stays whole; rich wraps titles at the table's width); on a
    terminal wrapped there (a line rich does not wrap, it cuts at the terminal's width)."""
    return Text(text, no_wrap=True, overflow="ignore") if console.width >= UNWRAPPED else text


def sites_table(sites, plan=None, title="attention sites") -> Table:
    table = Table(title=_title(title))
    table.add_column("site", overflow="fold", min_width=10)
    for col in ("kind", "B·Hq/Hkv·n·d", "mask", "causal"):
        table.add_column(col)
    table.add_column("MTA", overflow="fold", min_width=10)
    for s in sites:
        if not s.rewritable:
            status = Text.assemble(("exact:", "yellow"), f" {s.reason}")
        else:
            status = "found" if plan is None else plan[s.name].short if s.name in plan else "exact (planned)"
        mask = s.mask + (f", softcap {s.softcap:g}" if s.softcap else "")  # (Gemma-2's tanh cap, which the op takes)
        table.add_row(s.name, s.kind, f"{s.batch}·{s.q_heads}/{s.kv_heads}·{s.seq_len}·{s.head_dim}",
                      mask, "yes" if s.causal else "no", status)
    return table


@app.command()
def demo(
    model: str = typer.Option("auto", help="auto (real MiniLM if installed), minilm or builtin"),
    chunk_size: int = typer.Option(64, help="chunk size c"),
    local_chunks: int = typer.Option(2, help="local window L in chunks"),
    sinks: int = typer.Option(4, help="always-exact first tokens"),
    top_k: int = typer.Option(2, help="exactly attended chunks per query chunk"),
    long_n: int = typer.Option(16384, help="sequence length for timing the built-in model"),
    device: str = typer.Option("cpu", help="cpu, or cuda: capture, rewrite and run on the GPU (Triton kernels)"),
) -> None:
    """The built-in example: find and rewrite the attention of a model, compare, time."""
    from .config import MTAConfig
    from .demo import run_demo

    with _reported_errors():
        config = MTAConfig(chunk_size=chunk_size, local_chunks=local_chunks, sinks=sinks, top_k=top_k)
        if long_n < 2:
            raise ValueError(f"--long-n must be at least 2, got {long_n}")
        with console.status("starting") as status:
            result = run_demo(model, config, long_n, progress=lambda m: status.update(m), device=device)
    found = sum(s.is_attention for s in result.sites)
    console.print(Text.assemble((result.model, "bold"),
                                f": {result.rewritten} of {found} attention sites rewritten with MTA ({result.config})"))
    print_sites(result.sites, {s.name: result.config for s in result.sites if s.rewritable})
    summary = Table(title="original vs MTA")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    for key, value in result.metrics.items():
        summary.add_row(key, value)
    console.print(summary)


def op_calls_table(calls, title: str) -> Table:
    table = Table(title=_title(title))
    table.add_column("site", overflow="fold", min_width=10)
    for col in ("B·Hq/Hkv·n·d", "mask", "causal"):
        table.add_column(col)
    table.add_column("MTA", overflow="fold", min_width=10)
    for c in calls:
        config = "exact (the op's exact path)" if c.config == "exact" else c.config
        table.add_row(c.name, f"{c.batch}·{c.q_heads}/{c.kv_heads}·{c.seq_len}·{c.head_dim}", c.mask,
                      "yes" if c.causal else "no", config + (" + sink logits" if c.sink_logits else ""))
    return table


@app.command()
def find(program: str = typer.Argument(..., help="a program saved with torch.export.save (.pt2)")) -> None:
    """List the attention sites of a saved program, and why any is left exact; for a program that
    `rewrite` saved, also its mta.attention calls and their configurations."""
    from .api import find_attention, load_program
    from .passes.sites import describe_op_calls

    with _reported_errors():
        ep = load_program(program)
        sites = find_attention(ep)
    calls = describe_op_calls(ep.graph)
    if sites or not calls:
        print_sites(sites, title=f"attention sites of {program}")
    if calls:
        console.print(op_calls_table(calls, f"mta.attention calls of {program}"))
        exact = sum(c.config == "exact" for c in calls)
        console.print(f"already rewritten: {len(calls) - exact} site(s) call mta.attention with MTA, {exact} the "
                      "op's exact path")
    elif not sites:
        console.print(f"no attention (and no softmax) found in {program}")


def _configuration(chunk_size: int | None, local_chunks: int, sinks: int, top_k: int, plan: str, *, required: bool):
    """(one MTAConfig or None, a Plan or None) from the options: --chunk-size (with the other
    three; validated by MTAConfig) or --plan, not both; ``required``: one of them must be given."""
    from .config import MTAConfig, Plan

    given = chunk_size is not None
    if given and plan:
        raise ValueError("give either --chunk-size (one configuration for all sites) or --plan, not both")
    if required and not (given or plan):
        raise ValueError("give either --chunk-size (one configuration for all sites) or --plan")
    return (MTAConfig(chunk_size, local_chunks, sinks, top_k) if given else None), (Plan.load(plan) if plan else None)


def _boundaries(separators: str, segment_input: str, plan=None):
    """Boundaries from --separators "13,30" (None without it); with a --plan that carries other
    boundaries, a one-line error in the command line's words."""
    from .config import Boundaries

    if not separators.strip():
        return None
    try:
        ids = tuple(int(x) for x in separators.split(","))
    except ValueError:
        raise ValueError(f"--separators takes comma-separated token ids, got {separators!r}") from None
    boundaries = Boundaries(ids, segment_input)
    if plan is not None and plan.boundaries is not None and plan.boundaries != boundaries:
        raise ValueError(f"the plan chunks by {plan.boundaries}, --separators by {boundaries}: give one (the plan's "
                         "apply without --separators)")
    return boundaries


@app.command(name="capture")
def capture_cmd(
    model: str = typer.Argument(..., help="a model saved with transformers' save_pretrained (a folder with config.json) "
                                          "or a .gguf file, or a PEFT adapter's folder (merged into its base model, saved "
                                          "here too); read offline"),
    output: str = typer.Option(..., "--output", "-o", help="where to save the captured program (.pt2)"),
    tokens: int = typer.Option(512, help="the example's sequence length (the program takes any length and batch)"),
    batch: int = typer.Option(2, help="the example's batch"),
    text: str = typer.Option("", help="a UTF-8 text file: the example (and --samples) are windows of its tokens, by "
                                      "the tokenizer saved with the model (default: random token ids)"),
    samples: int = typer.Option(0, help="also write this many calibration samples, windows of --text, for calibrate --data"),
    samples_output: str = typer.Option("", "--samples-output", help="where to write the samples (torch.save)"),
    attn: str = typer.Option("auto", help="transformers' attention implementation: sdpa, eager or auto (sdpa where "
                                          "transformers has it for the model, else eager)"),
    experts: str = typer.Option("auto", help="mixture-of-experts layers: transformers' experts_implementation (auto: "
                                             "its default; batched_mm exports to ONNX)"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
) -> None:
    """Capture a saved transformers model (text, or image: random pixel values) as a program the other
    commands take (and, from a text, its calibration samples)."""
    from .models import capture_saved_model

    with _reported_errors():
        with console.status(f"loading {model}") as status:
            done = capture_saved_model(model, output, tokens=tokens, batch=batch, text=text or None, samples=samples,
                                       samples_output=samples_output or None, attn_implementation=attn, dtype=dtype,
                                       experts_implementation=None if experts == "auto" else experts,
                                       progress=status.update)
    print_sites(done.sites, title=f"attention sites of {done.description}")
    names = ", ".join(n.name for n in done.program.graph.nodes if n.op == "placeholder"
                      and n.name in done.program.graph_signature.user_inputs)
    wrote = f"; {done.samples} calibration samples in {samples_output}" if done.samples else ""
    console.print(f"captured on {done.example}; inputs: {names}; saved {output}{wrote}")


@app.command(name="separators")
def separators_cmd(
    model: str = typer.Argument(..., help="a model saved with transformers' save_pretrained (with its tokenizer) or a "
                                          ".gguf file, or a PEFT adapter's folder; read offline"),
    end: list[str] = typer.Option(["\\n"], "--end", help="text a separator token ends with (\\n, \\t and \\r "
                                                          "understood); repeat for several; default: a newline"),
) -> None:
    """Print the ids of the tokens whose text ends with --end, comma-separated: boundary chunks'
    --separators for calibrate, rewrite, export and generate (lines by default;
    sentences: --end '\\n' --end . --end '?' --end '!')."""
    from .models import saved_separator_ids

    ends = tuple(_unescape(text) for text in end)
    with _reported_errors():
        ids, vocabulary = saved_separator_ids(model, ends)
    typer.echo(",".join(str(i) for i in ids))
    err_console.print(f"{len(ids)} of {vocabulary} tokens end with {' or '.join(repr(e) for e in ends)}",
                      highlight=False)


def _unescape(text: str) -> str:
    """--end's text with the escapes \\n, \\t, \\r (and \\\\) turned into their characters."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: escapes[m.group(1)], text)


@app.command(name="generate")
def generate_cmd(
    model: str = typer.Argument(..., help="a language model saved with transformers' save_pretrained (with its "
                                          "tokenizer) or a .gguf file, or a PEFT adapter's folder (merged into its base "
                                          "model); read offline"),
    prompt: str = typer.Option(..., "--prompt", help="a UTF-8 text file: the prompt"),
    tokens: int | None = typer.Option(None, help="the prompt's first N tokens (default: all of it)"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="tokens to generate (greedy)"),
    chunk_size: int | None = typer.Option(None, help="one MTA configuration for every layer: chunk size c"),
    local_chunks: int = typer.Option(1, help="local window L in chunks"),
    sinks: int = typer.Option(0, help="always-exact first tokens"),
    top_k: int = typer.Option(0, help="exactly attended chunks per query chunk"),
    plan: str = typer.Option("", help="a plan (JSON, e.g. from calibrate) instead of one configuration"),
    separators: str = typer.Option("", help="boundary chunks on the prompt: token ids that end a segment, "
                                            "comma-separated (a plan calibrated with them carries its own)"),
    compare: bool = typer.Option(False, "--compare", help="also generate with the original model, timed the same way"),
    prefill_chunk: int | None = typer.Option(None, "--prefill-chunk", help="prefill the prompt in pieces of P tokens, "
                                             "each after the first continued over the cache"),
    decode: bool = typer.Option(False, "--decode", help="MTA in decoding too: each new token attends to its window "
                                "and top-k chunks and to chunk summaries kept with the cache (default: exact)"),
    attn: str = typer.Option("auto", help="the model's own attention for its exact calls: sdpa, eager or auto"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16"),
) -> None:
    """Generate text from a saved language model with MTA on the prompt (use_mta): the prompt's
    attention through the op, each new token exact over the cache (--decode: through MTA too)."""
    from .api import resolve_boundaries
    from .models import generate_saved_model

    with _reported_errors():
        cfg, chosen = _configuration(chunk_size, local_chunks, sinks, top_k, plan, required=True)
        boundaries = _boundaries(separators, "input_ids", chosen)
        with console.status(f"loading {model}") as status:
            done = generate_saved_model(model, prompt, new_tokens=max_new_tokens, tokens=tokens, config=cfg,
                                        plan=chosen, boundaries=boundaries, compare=compare,
                                        attn_implementation=attn, dtype=dtype, prefill_chunk=prefill_chunk,
                                        decode=decode, progress=status.update)
    what = f"plan {plan}" if plan else cfg.short
    chunks = resolve_boundaries(boundaries, chosen)
    what += f"; {chunks}" if chunks is not None else ""
    if prefill_chunk is not None:
        what += f"; prefilled in pieces of {prefill_chunk} tokens"
    if done.decoding_layers is not None:
        what += "; MTA decoding in {} of {} layers".format(*done.decoding_layers)
    line = f"{done.description}: {done.prompt_tokens} prompt tokens, {len(done.tokens)} generated with MTA ({what}) " \
           f"in {done.seconds:.2f} s"
    if done.original_seconds is not None:
        line += (f"; the original model {done.original_seconds:.2f} s ({done.original_seconds / done.seconds:.2f}×), "
                 f"the first {done.same_tokens} of {len(done.tokens)} tokens as its")
    console.print(line, highlight=False)
    console.print(done.text, highlight=False)


@app.command(name="rewrite")
def rewrite_cmd(
    program: str = typer.Argument(..., help="a program saved with torch.export.save (.pt2)"),
    output: str = typer.Option(..., "--output", "-o", help="where to save the rewritten program (.pt2)"),
    chunk_size: int | None = typer.Option(None, help="one MTA configuration for every site: chunk size c"),
    local_chunks: int = typer.Option(1, help="local window L in chunks"),
    sinks: int = typer.Option(0, help="always-exact first tokens"),
    top_k: int = typer.Option(0, help="exactly attended chunks per query chunk"),
    plan: str = typer.Option("", help="a plan (JSON) instead of one configuration"),
    separators: str = typer.Option("", help="boundary chunks: token ids that end a segment, comma-separated "
                                            "(e.g. the tokenizer's ids of '.' and newline)"),
    segment_input: str = typer.Option("input_ids", help="with --separators: the program's token-id input"),
    keep_exact: bool = typer.Option(False, "--keep-exact", help="leave the sites a plan keeps exact as captured "
                                                                "(default: they run the op's exact path, SDPA)"),
) -> None:
    """Rewrite the attention of a saved program into MTA and save the result (atomically)."""
    from .api import count_exact_nodes, count_mta_nodes, example_inputs, load_program, rewrite, save_program

    with _reported_errors():
        check_outputs([program], [output])  # before the work
        cfg, chosen = _configuration(chunk_size, local_chunks, sinks, top_k, plan, required=True)
        boundaries = _boundaries(separators, segment_input, chosen)
        with console.status(f"rewriting {program}"):
            ep = load_program(program)
            args, kwargs = example_inputs(ep)
            module = rewrite(ep, args, kwargs, config=cfg, plan=chosen, boundaries=boundaries,
                             lower_exact=not keep_exact)
            save_program(module, output, args, kwargs)
    print_sites(module.mta_sites, module.mta_plan, title=f"{program} → {output}")
    chunks = f" (boundary chunks: {module.mta_boundaries})" if module.mta_boundaries is not None else ""
    exact = count_exact_nodes(module)
    exact = f", {exact} exact site(s) the op's exact path (SDPA)" if exact else ""
    console.print(f"{count_mta_nodes(module)} site(s) now call mta.attention{chunks}{exact}; saved {output}")


@app.command(name="export")
def export_cmd(
    program: str = typer.Argument(..., help="a program saved with torch.export.save (.pt2): an original, or one that "
                                            "`rewrite` saved"),
    output: str = typer.Option(..., "--output", "-o", help="where to write the ONNX model (.onnx)"),
    chunk_size: int | None = typer.Option(None, help="rewrite first, one configuration for every site: chunk size c"),
    local_chunks: int = typer.Option(1, help="local window L in chunks"),
    sinks: int = typer.Option(0, help="always-exact first tokens"),
    top_k: int = typer.Option(0, help="exactly attended chunks per query chunk"),
    plan: str = typer.Option("", help="rewrite first with a plan (JSON); with neither option the program is "
                                      "exported as it is"),
    opset: int = typer.Option(0, help="ONNX opset of the model (0: the exporter's default)"),
    separators: str = typer.Option("", help="rewrite first with boundary chunks: token ids that end a segment, "
                                            "comma-separated"),
    segment_input: str = typer.Option("input_ids", help="with --separators: the program's token-id input"),
) -> None:
    """Export a saved program to ONNX (atomically), MTA sites as mta nodes that stock onnxruntime runs."""
    from pathlib import Path

    import onnx
    import torch

    from .api import example_inputs, load_program
    from .onnx import ALL_SITE_OP_TYPES, DOMAIN, export_onnx, model_opset
    from .onnx.export import exporter_failure

    with _reported_errors():
        # (before the work; a model over 1.5 GB keeps its weights beside it, in <output>.data)
        check_outputs([program], [output, *([f"{output}.data"] if output else [])])
        cfg, chosen = _configuration(chunk_size, local_chunks, sinks, top_k, plan, required=False)
        if opset < 0:
            raise ValueError(f"--opset must be positive, got {opset}")
        boundaries = _boundaries(separators, segment_input, chosen)
        if boundaries is not None and cfg is None and chosen is None:
            raise ValueError("--separators needs --chunk-size or --plan (boundary chunks apply when rewriting)")
        weights_beside = Path(f"{output}.data")
        had_weights = weights_beside.is_file()
        with console.status(f"exporting {program} to ONNX"):
            ep = load_program(program)
            args, kwargs = example_inputs(ep)
            try:
                proto = export_onnx(ep, args, output, kwargs, config=cfg, plan=chosen, boundaries=boundaries,
                                    opset=opset or None)
            except torch.onnx.OnnxExporterError as exc:
                raise ValueError(f"torch.onnx could not export {program}: {exporter_failure(exc)}") from None
    sites = sum(n.domain == DOMAIN and n.op_type in ALL_SITE_OP_TYPES for n in proto.graph.node)
    beside = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    console.print(f"{sites} MTA site(s) as {DOMAIN} nodes, the model carrying their functions "
                  f"(opset {model_opset(proto)}); "
                  f"saved {output}" + (f" (its weights in {output}.data beside it: keep the two together)" if beside else "")
                  + (f" (removed {output}.data, the weights of the model it replaced)"
                     if had_weights and not weights_beside.exists() else "")
                  + ("" if sites else " (no MTA site: the program's attention is exported exact)"))
    console.print(f"inputs: {', '.join(i.name for i in proto.graph.input)}; "
                  f"outputs: {', '.join(o.name for o in proto.graph.output)}", highlight=False)


@app.command()
def calibrate(
    program: str = typer.Argument(..., help="a program saved with torch.export.save (.pt2)"),
    data: str = typer.Option(..., "--data", help="calibration samples: torch.save of a list of argument tuples, keyword dicts "
                                                   "or tensors, bound to the program's inputs by name"),
    budget: float = typer.Option(..., help="largest acceptable end-to-end error of the first output"),
    output: str = typer.Option(..., "--output", "-o", help="where to write the plan (JSON); the report goes beside it"),
    metric: str = typer.Option("rel_l2", help="rel_l2, cosine or kl"),
    holdout: float = typer.Option(0.25, help="fraction of samples held out for verification"),
    seed: int = typer.Option(0, help="seed of the calibration/held-out split"),
    learn_summaries: bool = typer.Option(False, "--learn-summaries",
                                         help="fit learned summaries (MTA_SPEC summary=\"learned\") for the chosen "
                                              "plan and cheaper ones; kept where they win"),
    cluster_keys: bool = typer.Option(False, "--cluster-keys",
                                      help="fit clustered summaries (MTA_SPEC's learned clustering of keys; non-causal "
                                           "sites) for the chosen plan and cheaper ones; kept where they win"),
    separators: str = typer.Option("", help="calibrate boundary chunks: token ids that end a segment, comma-separated "
                                            "(the plan carries them)"),
    segment_input: str = typer.Option("input_ids", help="with --separators: the program's token-id input"),
    measure_costs: bool | None = typer.Option(None, "--measure-costs/--model-costs",
                                              help="cost candidates by timing them here (the op against the exact "
                                                   "path on each site's inputs), or by the cost model; default: "
                                                   "modelled on the CPU, timed on a GPU"),
    cost_model: str | None = typer.Option(None, "--cost-model",
                                          help="the cost model: cpu (fitted on this project's CPU box; the default on "
                                               "the CPU), work (flops and bytes alone, no per-call costs; the default "
                                               "on a GPU, where it picks what to time) or a JSON file of "
                                               "calibration.cost.TimeModel's fields (benchmarks/bench_cost_model.py --fit)"),
    device: str = typer.Option("cpu", help="cpu, or cuda (cuda:N): calibrate there, the program and the samples "
                                           "moved to the GPU (MTA sites then run the Triton kernels)"),
    last_positions: int | None = typer.Option(None, "--last-positions",
                                              help="measure every error over the last N positions of each sample only "
                                                   "(a language model that generates after long prompts)"),
) -> None:
    """Choose each site's configuration from data: the fastest plan within the budget."""
    from pathlib import Path

    import torch

    from .api import load_program
    from .calibration import calibrate as run_calibration
    from .calibration.cost import TIME_MODELS, load_time_model
    from .calibration.report import report_paths
    from .demo import check_device, to_device

    with _reported_errors():
        dev = check_device(device)
        # before any work: the plan and its report go there at the end
        cost_file = cost_model if cost_model not in (None, *TIME_MODELS) else ""
        check_outputs([program, data, cost_file], [output, *(report_paths(output) if output else ())])
        if not Path(data).is_file():
            raise ValueError(f"no such file: {data}")
        try:
            samples = torch.load(data, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{data} is not a torch.save file of samples ({type(exc).__name__})") from None
        if not isinstance(samples, (list, tuple)):
            raise ValueError(f"{data} must hold a list of samples, got {type(samples).__name__}")
        boundaries = _boundaries(separators, segment_input)
        model = None if cost_model is None else load_time_model(cost_model)
        ep = load_program(program, dev)  # also a program saved on a GPU, to the CPU
        plan = run_calibration(ep, to_device(list(samples), dev), budget=budget, metric=metric, holdout=holdout,
                               seed=seed, output=output, learn_summaries=learn_summaries, boundaries=boundaries,
                               cluster_keys=cluster_keys, measure_costs=measure_costs, cost_model=model,
                               last_positions=last_positions)
    meta = plan.metadata
    over = f", the last {last_positions} positions" if last_positions is not None else ""
    table = Table(title=_title(f"plan for {program} (budget {budget}, {metric}{over})"))
    table.add_column("site", overflow="fold")
    table.add_column("choice", overflow="fold")
    table.add_column("local error", justify="right")
    table.add_column("relative cost", justify="right")
    for name, entry in plan.sites.items():
        choice = "exact" if entry.config is None else entry.config.short
        table.add_row(name, choice, f"{entry.error or 0:.3g}", f"{entry.relative_cost or 1:.3f}")
    console.print(table)
    console.print(f"held-out error {meta['holdout_error']:.4g} ≤ {budget}; attention cost {meta['relative_attention_cost']:.3f} "
                  f"of exact, costs {meta['costs']}; {meta['wall_time_s']} s; plan {output}, report beside it")
    if plan.sites and len(meta.get("sites_without_candidates", ())) == len(plan.sites):
        lengths = "/".join(str(n) for n in meta["site_lengths"])
        hint = " or without --separators (boundary chunks cost more to lay out than fixed ones)" if \
            plan.boundaries is not None else ""
        _warn(f"no configuration was cheaper than exact attention at any site at n = {lengths} under these costs: "
              f"every site stays exact; calibrate on longer samples{hint}")


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, as errors are: the reason, not the file and line of our
    code that raised it."""
    _warn(message)


def _warn(message) -> None:
    """A warning (ours or a library's) as one line, printed as written, like ``_fail``'s errors."""
    err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"), highlight=False, soft_wrap=True)


def main() -> None:
    import logging
    import warnings

    warnings.showwarning = _show_warning

    # (capture and export quiet these within their calls, capture.library_logs_quiet; the commands
    # call the libraries elsewhere too, loading and moving programs)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    app()
