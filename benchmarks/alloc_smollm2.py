"""Mixed-precision bit allocation on SmolLM2-135M: ILP vs greedy vs best uniform scheme.

One run: sensitivities are measured once (``--estimator``, default ``fisher``; cached
under ``$PTQ_CACHE/sensitivity``) on 4 x 256 calibration tokens of the default text;
for budgets 4.25 / 4.5 / 5 / 6 bits per weight (scales included) the ILP allocation,
the greedy allocation (same sensitivities, same candidates) and every uniform scheme
that fits the budget are quantized with RTN and evaluated: perplexity on 4096 held-out
Britannica tokens (``default_eval_file()``), 512-token windows. Identical allocations
are evaluated once. The table and its plot (``--out`` with ``.png``) are rewritten after every
evaluation (partial results survive an interrupted run).

With ``--latency-caps 1.1,1.25`` every budget is also a modelled-latency cap (a multiple
of uniform INT4 g64's latency under ``--kernel-efficiency``, default ``h200-ptq-fp16``:
ptq's own kernels measured on an H200): size and latency are two rows of one integer
program, where the greedy baseline (best of four pricing rules) is no longer exact.

Candidates avoid INT4 asymmetric g32: SmolLM2's weights (from a Q4_1 GGUF) already sit
on that grid, which would make it lossless. ``int4_g128`` only fits ``down_proj``
(K = 1536; 576 is not a multiple of 128).

Usage::

    .venv/bin/python benchmarks/alloc_smollm2.py [--estimator fisher] [--out PATH]
    .venv/bin/python benchmarks/alloc_smollm2.py --latency-caps 1.1,1.25 \
        --out benchmarks/results/alloc_smollm2_latency.md
"""

from __future__ import annotations

import argparse
import copy
import queue
import time
from multiprocessing import get_context
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ptq.calibration.text import calibration_batches
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.models.paths import cache_dir, default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.passes.allocation import (
    Allocation,
    build_problem,
    parse_candidates,
    solve_greedy,
    solve_ilp,
    uniform_allocations,
)
from ptq.passes.allocation.kernel_efficiency import parse_latency_model
from ptq.passes.allocation.measure import MeasureConfig, cached_sensitivity
from ptq.passes.bit_allocation import DEFAULT_TIES, apply_allocation, tied_groups
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import get_scheme

CANDIDATES = "int8_channel,fp8,int4_g128,int4_g64,nvfp4,mxfp4,int3_g64,fp16"
BUDGETS = (4.25, 4.5, 5.0, 6.0)
RESULTS = Path(__file__).parent / "results"
Row = tuple[str, str, Allocation]  # (budget label, method label, allocation)


def key(a: Allocation) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(a.choice.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimator", default="fisher")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS / "alloc_smollm2.md")
    ap.add_argument("--model", default="default", help="Model (smoke runs: a tiny folder).")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2, help="Evaluation processes (1 thread each).")
    ap.add_argument(
        "--candidates",
        default=CANDIDATES,
        help="Candidates the allocators choose among: a subset of the measured ones "
        "(sensitivities are always measured, and cached, for all of them).",
    )
    ap.add_argument(
        "--latency-caps",
        default="",
        help="Comma-separated multiples of uniform int4_g64's modelled latency; each bits "
        "budget is solved under each cap too (empty: size budgets only).",
    )
    ap.add_argument("--kernel-efficiency", default="h200-ptq-fp16")
    args = ap.parse_args()
    caps = [float(c) for c in args.latency_caps.split(",") if c.strip()]
    torch.set_num_threads(1)
    t0 = time.time()
    source = resolve_model(args.model, quiet=True)
    model, tok = load_fp_model(source)
    model.eval()
    scheme = get_scheme("w4a16")
    layers = list(build_plan(model, scheme).layers)
    cands = parse_candidates(CANDIDATES)
    calib = calibration_batches(
        tok, path=None, n_samples=args.samples, seqlen=args.calib_seqlen, seed=0
    )
    cfg = MeasureConfig(estimator=args.estimator, samples=args.samples, seqlen=args.calib_seqlen)
    t = time.time()
    table, path, hit = cached_sensitivity(
        model, layers, cands, calib, cfg, cache_dir() / "sensitivity", progress=True
    )
    measure_s = time.time() - t
    print(f"sensitivities: {path} ({'cached' if hit else f'measured in {measure_s:.0f} s'})")
    chosen = parse_candidates(args.candidates)
    unknown = sorted({c.name for c in chosen} - {c.name for c in cands})
    if unknown:
        ap.error(f"--candidates {unknown} are not measured; choose from {CANDIDATES}")
    problem = build_problem(
        table,
        chosen,
        latency=parse_latency_model(args.kernel_efficiency),
        tied=tied_groups(layers, DEFAULT_TIES),
        unit="bytes",
    )
    uniform = uniform_allocations(problem)
    ref = next((u.seconds for u in uniform if u.choice[layers[0]] == "int4_g64"), None)
    if caps and ref is None:
        ap.error("--latency-caps are multiples of uniform int4_g64: include it in --candidates")
    rows: list[Row] = []
    for b in BUDGETS:
        for cap in caps or [None]:
            label = f"{b}" if cap is None else f"{b} & {cap}x"
            limits = [f"{b}bits"] + ([] if cap is None else [f"{cap * ref}s"])  # type: ignore[operator]
            rows.append((label, "ILP", solve_ilp(problem, limits)))
            rows.append((label, "greedy", solve_greedy(problem, limits)))
            for u in uniform:
                fast = cap is None or u.seconds <= cap * ref  # type: ignore[operator]
                if u.bits_per_weight <= b + 1e-9 and fast:
                    rows.append((label, f"uniform {next(iter(u.choice.values()))}", u))
    ids = tokenize_eval_text(tok, default_eval_file(), args.eval_tokens)
    ppl: dict[tuple[tuple[str, str], ...], float] = {}
    fp_ppl: list[float] = []
    # ILP first, then the uniform schemes, then greedy: the comparison that matters first.
    order = sorted(
        rows, key=lambda r: (r[1] != "ILP", r[1] == "greedy", r[2].bits_per_weight < 4, r[0])
    )  # stable: budgets stay in table order
    tasks: list[Allocation | None] = []
    for _, _, a in order:
        if all(t is None or key(t) != key(a) for t in tasks):
            tasks.append(a)
    tasks.append(None)  # the FP model

    def evaluate(a: Allocation | None) -> float:
        net = copy.deepcopy(model)
        if a is not None:
            plan = build_plan(net, scheme)
            apply_allocation(plan, a.choice, cands)
            ctx = PassContext(progress=False)
            Pipeline([RTNPass()]).run(QuantState(model=net, plan=plan, tokenizer=tok), ctx)
        return perplexity(net, ids, seqlen=args.seqlen, progress=False)

    # Forked workers (one thread each: faster than two threads on a shared CPU) share
    # the FP model copy-on-write; each evaluates whole allocations from a task queue.
    mp = get_context("fork")
    todo, done = mp.Queue(), mp.Queue()
    for i in range(len(tasks)):
        todo.put(i)

    def worker() -> None:
        while True:
            try:
                i = todo.get(timeout=1)
            except queue.Empty:
                return
            t = time.time()
            done.put((i, evaluate(tasks[i]), time.time() - t))

    procs = [mp.Process(target=worker) for _ in range(args.workers)]
    for p in procs:
        p.start()
    for _ in range(len(tasks)):
        i, value, secs = done.get()
        a = tasks[i]
        if a is None:
            fp_ppl.append(value)
            print(f"FP ppl {value:.4f} ({secs:.0f} s)", flush=True)
        else:
            ppl[key(a)] = value
            labels = ", ".join(f"{b} {lab}" for b, lab, x in rows if key(x) == key(a))
            print(
                f"{labels}: {a.bits_per_weight:.4f} bpw  ppl {value:.4f} ({secs:.0f} s)", flush=True
            )
        write(args, rows, ppl, fp_ppl, measure_s, hit, time.time() - t0, ref)
    for p in procs:
        p.join()
    print(args.out.read_text())


def write(
    args: argparse.Namespace,
    rows: list[Row],
    ppl: dict[tuple[tuple[str, str], ...], float],
    fp_ppl: list[float],
    measure_s: float,
    hit: bool,
    elapsed: float,
    ref: float | None,
) -> None:
    """Markdown table (ILP vs best uniform vs greedy per budget) and the Pareto plot."""
    capped = any("&" in r[0] for r in rows)
    lines = [
        "# Mixed-precision bit allocation on SmolLM2-135M",
        "",
        f"Estimator `{args.estimator}` on {args.samples} x {args.calib_seqlen} calibration tokens "
        f"({'cached' if hit else f'{measure_s:.0f} s'}); candidates `{args.candidates}`; weights by RTN; "
        f"q/k/v and gate/up tied; perplexity on {args.eval_tokens} held-out Britannica tokens, "
        f"{args.seqlen}-token windows. "
        + (f"FP perplexity: {fp_ppl[0]:.4f}." if fp_ppl else "FP perplexity: (pending)."),
        "",
    ]
    if capped and ref is not None:
        lines += [
            f"Budgets `B & Cx`: at most B bits/weight *and* a modelled batch-1 decode latency "
            f"of at most C x uniform int4_g64's ({ref * 1e6:.2f} us for the budgeted layers, "
            f"kernel efficiencies `{args.kernel_efficiency}`). Latency columns: x int4_g64.",
            "",
        ]
    lines += [
        "| budget (bits/w) | ILP bpw | ILP ppl | best uniform (bpw) | uniform ppl | greedy bpw "
        "| greedy ppl | ILP / uniform | ILP / greedy | predicted dL ILP / greedy |"
        + (" latency ILP / greedy |" if capped else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if capped else ""),
    ]
    for b in dict.fromkeys(r[0] for r in rows):
        sel = [r for r in rows if r[0] == b]
        ilp = next(a for _, lab, a in sel if lab == "ILP")
        gr = next(a for _, lab, a in sel if lab == "greedy")
        unis = [(lab, a) for _, lab, a in sel if lab.startswith("uniform") and key(a) in ppl]
        best = min(unis, key=lambda u: ppl[key(u[1])]) if unis else None
        p_i, p_g = ppl.get(key(ilp)), ppl.get(key(gr))
        p_u = ppl[key(best[1])] if best else None

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        lines.append(
            f"| {b} | {ilp.bits_per_weight:.4f} | {f(p_i)} | "
            f"{best[0].removeprefix('uniform ') + f' ({best[1].bits_per_weight:.4f})' if best else '-'} | {f(p_u)} | "
            f"{gr.bits_per_weight:.4f} | {f(p_g)} | "
            f"{f(p_i / p_u) if p_i and p_u else '-'} | {f(p_i / p_g) if p_i and p_g else '-'} | "
            f"{ilp.objective:.4f} / {gr.objective:.4f} |"
            + (
                f" {ilp.seconds / ref:.3f} / {gr.seconds / ref:.3f} |"  # type: ignore[operator]
                if capped and ref
                else ""
            )
        )
    lines += ["", "Uniform schemes evaluated:", ""]
    seen: set[str] = set()
    for _, lab, a in rows:
        if lab.startswith("uniform") and lab not in seen and key(a) in ppl:
            seen.add(lab)
            lines.append(
                f"- {lab.removeprefix('uniform ')}: {a.bits_per_weight:.4f} bits/weight, ppl {ppl[key(a)]:.4f}"
            )
    png = args.out.with_suffix(".png").name
    lines += ["", f"![Pareto]({png})", "", f"Total run time {elapsed / 60:.1f} min.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    plot(args.out.with_suffix(".png"), rows, ppl, fp_ppl)


def plot(
    path: Path,
    rows: list[Row],
    ppl: dict[tuple[tuple[str, str], ...], float],
    fp_ppl: list[float],
) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    caps = dict.fromkeys(b.partition(" & ")[2] for b, _, _ in rows)
    for cap in caps:
        for label, style in (("ILP", "o-"), ("greedy", "s--")):
            pts = sorted(
                (a.bits_per_weight, ppl[key(a)])
                for b, lab, a in rows
                if lab == label and key(a) in ppl and b.partition(" & ")[2] == cap
            )
            if pts:
                name = f"{label} allocation" + (f" (latency <= {cap} int4_g64)" if cap else "")
                ax.plot(*zip(*pts, strict=True), style, label=name)
    done: set[str] = set()
    for _, lab, a in rows:
        if lab.startswith("uniform") and lab not in done and key(a) in ppl:
            done.add(lab)
            ax.plot(a.bits_per_weight, ppl[key(a)], "D", ms=8, label=lab)
    if fp_ppl:
        ax.axhline(fp_ppl[0], color="grey", ls=":", label="FP")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales)")
    ax.set_ylabel("perplexity (Britannica, 4096 tokens)")
    ax.set_title("SmolLM2-135M: mixed precision vs uniform (RTN)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
