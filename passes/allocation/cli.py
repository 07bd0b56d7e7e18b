"""Command line for bit allocation: ``ptq allocate`` and the ``--budget`` options of
``ptq quantize``.

``ptq allocate MODEL --candidates ... --estimator fisher --sweep 3.5:8:0.25 -o DIR``
measures sensitivities once (cached in ``DIR``), solves the integer program of Hubara et
al. (2020) for every budget of the sweep, and writes the Pareto report (``pareto.png``
with the uniform schemes marked, ``layers.png``, ``report.md``) plus ``allocations.json``.
With ``--eval`` each distinct allocation is quantized (``--method``) and its perplexity
on held-out text becomes the plotted value.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from ptq.errors import PtqError, PtqUsageError
from ptq.pipeline import Pass

ESTIMATOR_CHOICES = ("fisher", "hessian", "loss", "kl")


def parse_sweep(text: str) -> list[float]:
    """``"START:STOP:STEP"`` (inclusive of STOP) or ``"4,4.5,6"`` -> bits-per-weight list.

    Raises:
        ValueError: malformed text, a non-positive step, or an empty range.
    """
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0 or stop < start or start <= 0:
                raise ValueError
            n = int((stop - start) / step + 1e-9)
            return [round(start + i * step, 10) for i in range(n + 1)]
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(
            f"malformed --sweep {text!r}; use START:STOP:STEP (e.g. 3.5:8:0.25) or a list 4,4.5,6"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--sweep {text!r} needs positive bits-per-weight values")
    return values


def budget_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--budget``, ``--budget-latency``, ``--kernel-efficiency``, ``--candidates``,
    ``--estimator`` for ``quantize``."""
    from ptq.passes.bit_allocation import DEFAULT_CANDIDATES

    fn = click.option(
        "--estimator",
        type=click.Choice(ESTIMATOR_CHOICES),
        default="fisher",
        show_default=True,
        help="Sensitivity estimator for --budget.",
    )(fn)
    fn = click.option(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        show_default=True,
        help="Formats the allocation chooses among (fp16 = keep a layer dense).",
    )(fn)
    fn = click.option(
        "--kernel-efficiency",
        default=None,
        help=KERNEL_EFFICIENCY_HELP,
    )(fn)
    fn = click.option(
        "--budget-latency",
        default=None,
        help="Mixed precision within a modelled decode latency, e.g. 0.05ms; with --budget "
        "both must hold.",
    )(fn)
    fn = click.option(
        "--budget",
        default=None,
        help="Mixed precision within a size budget: 4.5bits (per weight) or 70MB.",
    )(fn)
    return fn


KERNEL_EFFICIENCY_HELP = (
    "Latency model for latency budgets: fraction of HBM bandwidth each candidate's kernel "
    "reaches. A preset (h200-ptq-fp16: ptq's kernels measured on an H200; roofline: all "
    "at peak, the default), a JSON file, or NAME=EFF,... with globs (int4_*=0.31)."
)


def allocation_pass_from_cli(
    budget: str | None,
    budget_latency: str | None,
    candidates: str,
    estimator: str,
    *,
    kernel_efficiency: str | None = None,
    cache_dir: Path | None = None,
) -> Pass | None:
    """The :class:`~ptq.passes.bit_allocation.BitAllocationPass` for ``ptq quantize``'s
    budget options, or None when neither budget is given. With both, ``budget`` bounds
    the size and ``budget_latency`` the modelled latency, in one integer program.

    Raises:
        PtqUsageError: a budget of the wrong kind, a bad kernel-efficiency table, or
            bad candidates.
    """
    from ptq.passes.allocation import parse_budget
    from ptq.passes.bit_allocation import BitAllocationConfig, BitAllocationPass

    if kernel_efficiency is not None and budget_latency is None:
        raise PtqUsageError("--kernel-efficiency models latency: it needs --budget-latency")
    if budget is None and budget_latency is None:
        return None
    try:
        if budget is not None and parse_budget(budget).kind == "seconds":
            raise ValueError(f"--budget {budget!r} is a latency; use --budget-latency")
        if budget_latency is not None and parse_budget(budget_latency).kind != "seconds":
            raise ValueError(f"--budget-latency {budget_latency!r} must be a time such as 2ms")
        config = BitAllocationConfig(
            budget=budget or str(budget_latency),
            latency_budget=budget_latency if budget is not None else None,
            kernel_efficiency=kernel_efficiency,
            candidates=candidates,
            estimator=estimator,  # type: ignore[arg-type]  # click.Choice
            cache_dir=cache_dir,
        )
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    return BitAllocationPass(config)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PtqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.command("allocate")
@click.argument("model", default="default")
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="Report folder."
)
@click.option("--candidates", default=None, help="Candidate formats (default: a broad set).")
@click.option(
    "--estimator", type=click.Choice(ESTIMATOR_CHOICES), default="fisher", show_default=True
)
@click.option("--sweep", default="3.5:8:0.25", show_default=True, help="Budgets START:STOP:STEP.")
@click.option(
    "--budget", default=None, help="Budget described layer by layer (default: mid-sweep)."
)
@click.option(
    "--budget-latency",
    default=None,
    help="Modelled-latency cap every allocation must meet too, e.g. 0.05ms.",
)
@click.option("--kernel-efficiency", default=None, help=KERNEL_EFFICIENCY_HELP)
@click.option("--min-bits-first-last", type=int, default=None, help="First/last layer bit floor.")
@click.option("--no-tie", is_flag=True, help="Do not tie q/k/v and gate/up.")
@click.option("--ignore", multiple=True, help="Layers left out (default: lm_head).")
@click.option("--calib", type=click.Path(path_type=Path), default=None)
@click.option("--calib-samples", type=int, default=8, show_default=True)
@click.option("--calib-seqlen", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval", "do_eval", is_flag=True, help="Measure perplexity of each allocation.")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None)
@click.option("--eval-tokens", type=int, default=4096, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--method", default="rtn", show_default=True, help="Weight method for --eval.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
@_friendly
def allocate(
    model: str,
    output: Path,
    candidates: str | None,
    estimator: str,
    sweep: str,
    budget: str | None,
    budget_latency: str | None,
    kernel_efficiency: str | None,
    min_bits_first_last: int | None,
    no_tie: bool,
    ignore: tuple[str, ...],
    calib: Path | None,
    calib_samples: int,
    calib_seqlen: int,
    seed: int,
    do_eval: bool,
    eval_text: Path | None,
    eval_tokens: int,
    seqlen: int,
    method: str,
    trust_remote_code: bool,
    quiet: bool,
) -> None:
    """Pareto sweep of mixed-precision allocations of MODEL, written to OUTPUT."""
    from ptq.calibration.text import calibration_batches
    from ptq.models.source import load_fp_model, resolve_model
    from ptq.passes.allocation import (
        InfeasibleBudgetError,
        build_problem,
        parse_budget,
        parse_candidates,
        solve_ilp,
        uniform_allocations,
    )
    from ptq.passes.allocation import sweep as run_sweep
    from ptq.passes.allocation.kernel_efficiency import parse_latency_model
    from ptq.passes.allocation.measure import MeasureConfig, cached_sensitivity, supported
    from ptq.passes.bit_allocation import DEFAULT_CANDIDATES, DEFAULT_TIES, tied_groups
    from ptq.plan import build_plan
    from ptq.scheme import get_scheme

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        bits = parse_sweep(sweep)
        cands, excluded = supported(parse_candidates(candidates or DEFAULT_CANDIDATES))
        cfg = MeasureConfig(
            estimator=estimator,  # type: ignore[arg-type]  # click.Choice
            samples=calib_samples,
            seqlen=calib_seqlen,
        )
        scheme = get_scheme("w4a16").with_overrides(ignore=ignore or None)
        also = [parse_budget(budget_latency)] if budget_latency else []
        if any(b.kind != "seconds" for b in also):
            raise ValueError(f"--budget-latency {budget_latency!r} must be a time such as 0.05ms")
        if budget is not None and parse_budget(budget).kind == "seconds":
            raise ValueError(f"--budget {budget!r} is a latency; use --budget-latency")
        timed = budget_latency is not None or kernel_efficiency is not None
        latency = parse_latency_model(kernel_efficiency) if timed else None
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    for msg in excluded:
        click.echo(f"note: {msg}")
    source = resolve_model(model, quiet=quiet)
    net, tok = load_fp_model(source, trust_remote_code=trust_remote_code)
    net.eval()
    if tok is None:
        raise PtqUsageError(f"{source.path} has no tokenizer; cannot tokenize calibration text")
    layers = list(build_plan(net, scheme).layers)
    ids = calibration_batches(
        tok, path=calib, n_samples=calib_samples, seqlen=calib_seqlen, seed=seed
    )
    output.mkdir(parents=True, exist_ok=True)
    table, path, hit = cached_sensitivity(net, layers, cands, ids, cfg, output, progress=not quiet)
    click.echo(f"sensitivities ({estimator}) {'loaded from' if hit else 'saved to'} {path}")
    try:
        problem = build_problem(
            table,
            cands,
            latency=latency,
            allowed=_first_last(layers, cands, min_bits_first_last),
            tied=() if no_tie else tied_groups(layers, DEFAULT_TIES),
            unit="bytes",
        )
        frontier = run_sweep(problem, [f"{b}bits" for b in bits], skip_infeasible=True, also=also)
        chosen = solve_ilp(problem, [budget, *also]) if budget else None
    except (InfeasibleBudgetError, ValueError) as exc:
        raise PtqUsageError(str(exc)) from None
    if not frontier and chosen is None:
        raise PtqUsageError(
            f"every budget of --sweep {sweep} is infeasible (cheapest: "
            f"{8 * problem.min_cost() / problem.n_weights:.4g} bits/weight"
            + (f"; with --budget-latency {budget_latency})" if also else ")")
        )
    chosen = chosen or frontier[len(frontier) // 2]
    uniform = uniform_allocations(problem)
    ppl: dict[str, float] = {}
    if do_eval:
        ppl = _evaluate_all(
            net,
            tok,
            scheme,
            cands,
            [chosen, *frontier, *uniform],
            ids,
            method,
            eval_text,
            eval_tokens,
            seqlen,
            quiet,
        )
    from ptq.passes.allocation import write_report

    def value(a: Any) -> float:
        return ppl[_key(a)] if ppl else float(a.objective)

    files = write_report(
        output,
        problem,
        chosen,
        frontier,
        uniform,
        value=value,
        ylabel="perplexity" if ppl else f"predicted {table.metric}",
    )
    summary = {
        "model": str(source.path),
        "estimator": estimator,
        "sensitivity_file": str(path),
        "chosen": chosen.to_dict(),
        "frontier": [a.to_dict() | _ppl(ppl, a) for a in frontier],
        "uniform": [a.to_dict() | _ppl(ppl, a) for a in uniform],
    }
    (output / "allocations.json").write_text(json.dumps(summary, indent=1))
    for a in frontier:
        extra = f"  ppl {ppl[_key(a)]:.4f}" if ppl else ""
        if a.seconds is not None:
            extra = f"  {a.seconds * 1e3:.4g} ms" + extra
        click.echo(f"{a.bits_per_weight:7.4f} bits/weight  dL {a.objective:.4g}{extra}")
    click.echo(f"wrote {files.markdown}, {files.pareto_png.name}, {files.layers_png.name}")


def _first_last(layers: list[str], cands: list[Any], bits: int | None) -> dict[str, Any]:
    from ptq.passes.allocation import at_least_bits

    if bits is None:
        return {}
    keep = at_least_bits(cands, bits)
    return {layers[0]: keep, layers[-1]: keep}


def _key(a: Any) -> str:
    return json.dumps(sorted(a.choice.items()))


def _ppl(ppl: dict[str, float], a: Any) -> dict[str, float]:
    return {"perplexity": ppl[_key(a)]} if ppl else {}


def _evaluate_all(
    net: Any,
    tok: Any,
    scheme: Any,
    cands: list[Any],
    allocs: list[Any],
    calibration: Any,
    method: str,
    eval_text: Path | None,
    eval_tokens: int,
    seqlen: int,
    quiet: bool,
) -> dict[str, float]:
    """Perplexity of each distinct allocation: copy, rewrite the plan, quantize, evaluate."""
    from ptq.evaluate import perplexity, tokenize_eval_text
    from ptq.models.paths import default_eval_file
    from ptq.passes.bit_allocation import AllocatedLoRCPass, apply_allocation
    from ptq.passes.registry import make_weight_pass
    from ptq.pipeline import PassContext, Pipeline, QuantState
    from ptq.plan import build_plan

    try:
        weight_pass = make_weight_pass(method)
    except ValueError as exc:
        raise PtqUsageError(str(exc)) from None
    ids = tokenize_eval_text(tok, eval_text or default_eval_file(), eval_tokens)
    out: dict[str, float] = {}
    by_name = {c.name: c for c in cands}
    for a in allocs:
        if _key(a) in out:
            continue
        model = copy.deepcopy(net)
        plan = build_plan(model, scheme)
        apply_allocation(plan, a.choice, cands)
        lorc = {
            n: {"rank": by_name[c].lorc_rank, "candidate": c}
            for n, c in a.choice.items()
            if by_name[c].lorc_rank
        }
        ctx = PassContext(
            progress=False, calibration=calibration, records={"allocation": {"lorc": lorc}}
        )
        Pipeline([AllocatedLoRCPass(weight_pass)]).run(QuantState(model, plan, tok), ctx)
        out[_key(a)] = perplexity(model, ids, seqlen=seqlen, progress=not quiet)
        click.echo(f"  {a.method} {a.bits_per_weight:.4f} bits/weight: ppl {out[_key(a)]:.4f}")
    return out
