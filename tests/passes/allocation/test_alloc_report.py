"""The report writes two PNGs and a markdown file that embeds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptq.passes.allocation import (
    SensitivityTable,
    build_problem,
    parse_candidates,
    solve_ilp,
    sweep,
    uniform_allocations,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_files(tmp_path: Path) -> None:
    cands = parse_candidates("int3_g64,int4_g128,nvfp4,int8_channel,fp16")
    rng = np.random.default_rng(7)
    layers = [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in ("up", "down")]
    shapes = {n: (512, 256) if n.endswith("up") else (256, 512) for n in layers}
    base = {"int3_g64": 4.0, "int4_g128": 1.0, "nvfp4": 1.2, "int8_channel": 0.02, "fp16": 0.0}
    losses = {n: {c: v * float(rng.uniform(0.5, 2)) for c, v in base.items()} for n in layers}
    problem = build_problem(SensitivityTable.from_mapping(losses, shapes), cands)
    chosen = solve_ilp(problem, "5bits")
    frontier = sweep(
        problem, [f"{b}bits" for b in (3, 3.5, 4.5, 5, 6, 8, 12)], skip_infeasible=True
    )
    uniform = uniform_allocations(problem)
    assert len(uniform) == 5 and len(frontier) == 6
    out = tmp_path / "report"
    files = write_report(out, problem, chosen, frontier, uniform)
    for png in (files.pareto_png, files.layers_png):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    text = files.markdown.read_text()
    assert "![Pareto frontier](pareto.png)" in text and "![Format per layer](layers.png)" in text
    for layer in layers:
        assert f"`{layer}`" in text
    assert f"{chosen.bits_per_weight:.4f}" in text
    assert sorted(p.name for p in out.iterdir()) == ["layers.png", "pareto.png", "report.md"]
