"""The benchmark runner and report behind ``srp4ctr bench``.

This module, the suites and ``goals.toml`` live in the repository's ``bench/`` folder (they are not
installed with the package: ``srp4ctr bench`` finds this folder in a source checkout and loads this
file from it). The suites are pytest-benchmark files (``bench_*.py``, see ``bench/README.md``).
One command runs the CPU suites — always with ``bench_ceilings.py``, which
measures the machine's GEMM rates and copy bandwidth in the same run — in one pytest process with
``--benchmark-json``, splits that JSON into one file per suite under ``RESULTS`` (so a run of a
few suites keeps the others' latest results), then writes ``OUT/report.md`` and its plots:

- per suite and table: the median of every case and provider, the speed-up against the table's
  eager-torch baseline (baseline median / median: above 1 is faster), the achieved FLOP rate and
  its fraction of the GEMM rate measured in the same run (the roofline), throughput where the
  case is a training step, and the interleaved medians where a suite measures them;
- the performance goals of the project's issues (``goals.toml``: each goal's text, the metric it
  reads and its threshold), each with its measured figure and "met",
  "not met", "reported" (a goal that asks for a figure, not a threshold) or "not measured"
  with the reason (no GPU, a backend that is not built, a suite that was not run);
- ``plots/latency_vs_candidates.png`` (median latency against the number of candidates, one line
  per provider) and ``plots/folded_vs_naive.png`` (the analytic cost of folded and naive
  inference — the paper's efficiency- and inference-FLOPs — beside the measured times);
- the load test of ``srp4ctr serve`` (``RESULTS/load_test.json`` of ``bench/load_test.py``:
  throughput, latency percentiles, server and engine time, errors, RSS) when there is one;
- the newest GPU result of ``bench/gpu_bench.py`` (``RESULTS/gpu_bench-*.json``, smoke runs
  excluded) when there is one;
- the machine (CPU model, cores, threads, torch / ONNX Runtime versions), the dates and the exact
  commands.

This module imports only the standard library (and ``srp4ctr.errors``) at import time (the
command line stays fast); matplotlib is imported when the plots are drawn, pytest runs in a child
process.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import inspect
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from srp4ctr.errors import BenchError

# suite name (bench/bench_<name>.py) -> title in the report; in report order
SUITES = {
    "engine_cpu": "Engine CPU scoring (one user, history 200)",
    "request": "End-to-end request (raw history + raw ids -> probabilities)",
    "onnx_cpu": "ONNX Runtime scorer graph",
    "kernels": "Kernel ops (candidate attention, Q-Former pooling, candidate tower)",
    "training": "Training throughput",
}
CEILINGS = "ceilings"
RUNNABLE = (CEILINGS, *SUITES)
STATUSES = ("met", "not met", "reported", "not measured")


# ------------------------------------------------------------------------------------- loading


@dataclass
class Row:
    """One pytest-benchmark case, with the keys the suites store in ``extra_info``."""

    suite: str
    table: str
    case: str
    provider: str
    median_s: float
    rounds: int
    x: float | None
    baseline: str | None
    flops: float | None
    min_bytes: float | None
    dtype: str
    device: str
    items: int | None
    unit: str | None
    extra: dict
    nodeid: str = ""


@dataclass
class SuiteResult:
    """One suite's JSON: its rows, interleaved rows, ceilings, skips and failures."""

    suite: str
    path: Path
    date: str
    smoke: bool
    meta: dict
    rows: list[Row] = field(default_factory=list)
    interleaved: list[Row] = field(default_factory=list)
    ceilings: list[dict] = field(default_factory=list)

    @property
    def skipped(self) -> list[dict]:
        return self.meta.get("skipped", [])

    @property
    def failed(self) -> list[dict]:
        return self.meta.get("failed", [])

    def ceiling(self, device: str, kind: str, dtype: str = "float32") -> float | None:
        """The measured rate (FLOP/s, or B/s for ``copy``) of ``kind`` on ``device``."""
        for c in self.ceilings:
            if c["device"] == device and c["kind"] == kind and c["dtype"] == dtype:
                return c["rate"]
        return None


def _suite_of(fullname: str) -> str:
    name = Path(fullname.split("::", 1)[0]).stem
    return name.removeprefix("bench_")


def _row(suite: str, b: dict) -> Row:
    e = b.get("extra_info", {})
    return Row(
        suite=suite, table=e.get("table") or b.get("group") or "", case=str(e.get("case", "")),
        provider=e.get("provider") or b.get("name", "?"), median_s=float(b["stats"]["median"]),
        rounds=int(b["stats"].get("rounds", 0)), x=e.get("x"), baseline=e.get("baseline"),
        flops=e.get("flops"), min_bytes=e.get("min_bytes"), dtype=e.get("dtype", "float32"),
        device=e.get("device", "cpu"), items=e.get("items"), unit=e.get("unit"), extra=e,
        nodeid=b.get("fullname", ""),
    )


def ceilings_of(benchmarks: Iterable[dict]) -> list[dict]:
    """The ceilings (rate = FLOPs or bytes / median) of the ``bench_ceilings.py`` cases."""
    out = []
    for b in benchmarks:
        e = b.get("extra_info", {})
        kind = e.get("ceiling")
        if not kind:
            continue
        med = float(b["stats"]["median"])
        work = e.get("min_bytes") if kind == "copy" else e.get("flops")
        if not work or med <= 0:
            continue
        out.append({"kind": kind, "device": e.get("device", "cpu"),
                     "dtype": e.get("dtype", "float32"), "case": e.get("case", ""),
                     "median_s": med, "rate": work / med,
                     "unit": "B/s" if kind == "copy" else "FLOP/s"})
    return out


def load_suite(path: Path) -> SuiteResult | None:
    """A suite file written by :func:`split_run`; None for other JSON (e.g. older formats)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    meta = doc.get("srp4ctr") if isinstance(doc, dict) else None
    if not isinstance(meta, dict) or "benchmarks" not in doc:
        return None
    suite = meta.get("suite") or Path(path).stem
    res = SuiteResult(suite=suite, path=Path(path), date=meta.get("date") or doc.get("datetime", ""),
                      smoke=bool(meta.get("smoke")), meta=meta,
                      ceilings=meta.get("ceilings") or ceilings_of(doc["benchmarks"]))
    for b in doc["benchmarks"]:
        row = _row(suite, b)
        if row.extra.get("ceiling"):
            continue
        (res.interleaved if row.extra.get("interleaved") else res.rows).append(row)
    return res


def load_results(results: Path) -> tuple[dict[str, SuiteResult], list[Path]]:
    """Every suite file under ``results`` (by suite name), and the JSON files that are not suite
    files (listed in the report as ignored)."""
    suites: dict[str, SuiteResult] = {}
    ignored: list[Path] = []
    for path in sorted(Path(results).glob("*.json")):
        if path.name.startswith("gpu_bench") or path.name == LOAD_TEST_JSON:
            continue
        res = load_suite(path)
        if res is None:
            ignored.append(path)
        else:
            suites[res.suite] = res
    return suites, ignored


def newest_gpu_result(results: Path) -> tuple[Path, dict] | None:
    """The newest non-smoke ``gpu_bench-*.json`` (bench/gpu_bench.py) under ``results``."""
    paths = sorted(p for p in Path(results).glob("gpu_bench-*.json")
                   if not p.name.startswith("gpu_bench-smoke"))
    for path in reversed(paths):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not doc.get("meta", {}).get("smoke"):
            return path, doc
    return None


def split_run(raw: Path, results: Path, suites: Iterable[str], *, command: str) -> list[Path]:
    """Split one pytest-benchmark JSON into ``results/<suite>.json`` per suite (every suite in
    ``suites``, even one whose cases were all skipped), each with the run's ceilings, its own
    skips and failures, and ``command``."""
    doc = json.loads(Path(raw).read_text())
    meta = doc.get("srp4ctr", {})
    ceilings = ceilings_of(doc.get("benchmarks", []))
    written = []
    for suite in suites:
        part = {k: v for k, v in doc.items() if k not in ("benchmarks", "srp4ctr")}
        part["benchmarks"] = [b for b in doc.get("benchmarks", [])
                              if _suite_of(b.get("fullname", "")) == suite]
        part["srp4ctr"] = {
            **meta, "suite": suite, "command": command, "ceilings": ceilings,
            "skipped": [s for s in meta.get("skipped", []) if s.get("suite") == suite],
            "failed": [s for s in meta.get("failed", []) if s.get("suite") == suite],
        }
        path = Path(results) / f"{suite}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(part, indent=1, default=str))
        os.replace(tmp, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------ formatting


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    ms = seconds * 1e3
    for limit, spec in ((100, ".0f"), (10, ".1f"), (1, ".2f")):
        if ms >= limit:
            return format(ms, spec)
    return format(ms, ".3f")


def fmt_x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def fmt_pct(frac: float | None) -> str:
    return "—" if frac is None else f"{100 * frac:.1f}%"


def fmt_rate(rate: float | None, unit: str = "FLOP/s") -> str:
    if rate is None:
        return "—"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if rate >= scale:
            return f"{rate / scale:.3g} {prefix}{unit}"
    return f"{rate:.3g} {unit}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# -------------------------------------------------------------------------------------- analysis


def speedup(baseline_s: float | None, s: float | None) -> float | None:
    """How many times faster than the baseline (baseline median / median)."""
    if not baseline_s or not s:
        return None
    return baseline_s / s


def roofline_fraction(res: SuiteResult, row: Row) -> float | None:
    """Achieved FLOP rate over the GEMM rate of the row's device and dtype, measured in the run."""
    gemm = res.ceiling(row.device, "gemm", row.dtype)
    if not row.flops or not gemm or row.median_s <= 0:
        return None
    return row.flops / row.median_s / gemm


def copy_fraction(res: SuiteResult, row: Row) -> float | None:
    bw = res.ceiling(row.device, "copy", "float32")
    if not row.min_bytes or not bw or row.median_s <= 0:
        return None
    return row.min_bytes / row.median_s / bw


def _ordered(items: Iterable, key: Callable) -> list:
    """Unique keys in order of first appearance."""
    seen: dict = {}
    for it in items:
        seen.setdefault(key(it), None)
    return list(seen)


def tables_of(res: SuiteResult) -> dict[str, list[Row]]:
    """The suite's rows by table, each table ordered by x (or case) then provider."""
    out: dict[str, list[Row]] = {}
    for row in res.rows:
        out.setdefault(row.table, []).append(row)
    for table, rows in out.items():
        cases = _ordered(rows, lambda r: r.case)
        providers = _ordered(rows, lambda r: r.provider)
        rows.sort(key=lambda r: (r.x if r.x is not None else math.inf, cases.index(r.case),
                                 providers.index(r.provider)))
        out[table] = rows
    return out


def _median_of(rows: list[Row], case: str, provider: str) -> float | None:
    for r in rows:
        if r.case == case and r.provider == provider:
            return r.median_s
    return None


def suite_section(res: SuiteResult, title: str) -> list[str]:
    """The markdown of one suite: a table per ``table``, the interleaved medians, the skips."""
    lines = [f"## {title}", ""]
    flag = " — **smoke run: one round, smallest shapes; measures nothing**" if res.smoke else ""
    lines.append(f"`{res.path.name}`, run {res.date}{flag}.")
    lines.append("")
    for table, rows in tables_of(res).items():
        baseline = next((r.baseline for r in rows if r.baseline), None)
        lines.append(f"### {table}")
        lines.append("")
        if baseline:
            lines.append(f"Speed-up = median of `{baseline}` (eager torch) / median; above 1 is "
                         "faster. Roofline = achieved FLOP rate / the GEMM rate of the same "
                         "dtype measured in this run.")
            lines.append("")
        has_bytes = any(r.min_bytes for r in rows) and any(
            res.ceiling(r.device, "copy") for r in rows)
        has_items = any(r.items for r in rows)
        header = ["case", "provider", "median ms", "speed-up", "GFLOP/s", "% of GEMM roofline"]
        header += ["% of copy BW"] if has_bytes else []
        header += ["throughput"] if has_items else []
        header += ["max abs diff"]
        body = []
        for r in rows:
            base = _median_of(rows, r.case, r.baseline) if r.baseline else None
            rate = r.flops / r.median_s if r.flops and r.median_s > 0 else None
            frac = roofline_fraction(res, r)
            line = [r.case, f"`{r.provider}`", fmt_ms(r.median_s),
                    fmt_x(speedup(base, r.median_s)),
                    "—" if rate is None else f"{rate / 1e9:.1f}",
                    "—" if frac is None else f"{fmt_pct(frac)} ({r.dtype})"]
            if has_bytes:
                line.append(fmt_pct(copy_fraction(res, r)))
            if has_items:
                line.append("—" if not r.items else
                            f"{r.items / r.median_s:,.0f} {r.unit or 'items'}/s")
            diff = r.extra.get("max_abs_diff")
            line.append("—" if diff is None else f"{diff:.1e}")
            body.append(line)
        lines += _table(header, body) + [""]
    for row in res.interleaved:
        lines += interleaved_section(res, row)
    lines += skipped_section(res)
    return lines


def interleaved_section(res: SuiteResult, row: Row) -> list[str]:
    e = row.extra
    med: dict = e.get("medians_ms", {})
    tables, baselines = e.get("provider_tables", {}), e.get("baselines", {})
    flops, dtypes = e.get("flops_by_provider", {}), e.get("dtype_by_provider", {})
    rounds = e.get("rounds", {})
    title = (f"### Interleaved, {row.case} (round-robin in one loop: the figures to quote on a "
             "shared machine)")
    lines = [title, ""]
    body = []
    for p, ms in med.items():
        base = baselines.get(tables.get(p, ""), None)
        sp = speedup(med.get(base) if base else None, ms)
        gemm = res.ceiling(row.device, "gemm", dtypes.get(p, "float32"))
        frac = flops[p] / (ms / 1e3) / gemm if flops.get(p) and gemm and ms > 0 else None
        n = rounds.get(p) if isinstance(rounds, dict) else rounds
        body.append([f"`{p}`", tables.get(p, "—"), fmt_ms(ms / 1e3),
                     fmt_x(sp) + (f" vs `{base}`" if sp is not None else ""),
                     fmt_pct(frac), str(n) if n is not None else "—"])
    lines += _table(["provider", "table", "median ms", "speed-up", "% of GEMM roofline",
                     "rounds"], body)
    for p, why in (e.get("unavailable") or {}).items():
        lines.append(f"- `{p}` not measured: {why}")
    return [*lines, ""]


def skipped_section(res: SuiteResult) -> list[str]:
    lines = []
    if res.failed:
        lines += ["**Failed cases:**", ""]
        lines += [f"- `{f['nodeid']}` ({f.get('when', 'call')}): {f.get('message', '')}"
                  for f in res.failed]
        lines.append("")
    if res.skipped:
        by_reason: dict[str, list[str]] = {}
        for s in res.skipped:
            by_reason.setdefault(s.get("reason", "?"), []).append(s["nodeid"].split("::")[-1])
        lines += ["Not measured here (skipped cases):", ""]
        for reason, nodes in by_reason.items():
            shown = ", ".join(f"`{n}`" for n in nodes[:6])
            more = f" and {len(nodes) - 6} more" if len(nodes) > 6 else ""
            lines.append(f"- {reason}: {shown}{more}")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------ goals


@dataclass
class Verdict:
    """A goal's measured figure and its status (one of :data:`STATUSES`)."""

    figure: str
    status: str


@dataclass
class Goal:
    """A performance goal of an issue, as ``goals.toml`` states it: ``metric`` (a key of
    :data:`METRICS`: what is measured and how it is compared) and that metric's parameters
    (suite, providers, case, threshold)."""

    id: str
    issue: int
    text: str
    metric: str
    params: dict = field(default_factory=dict)

    def evaluate(self, ctx: Context) -> Verdict:
        return METRICS[self.metric](ctx, **self.params)


@dataclass
class Measure:
    seconds: float
    source: str  # "interleaved medians" or "medians"
    row: Row
    smoke: bool


def _params(nodeid: str) -> set[str]:
    """The parameter ids of a test node id (``test[a-b-c]`` -> {a, b, c})."""
    return set(nodeid.rsplit("[", 1)[-1].rstrip("]").split("-")) if "[" in nodeid else set()


class Context:
    """What goal evaluation reads: the suites, the GPU result, and lookups over them."""

    def __init__(self, suites: dict[str, SuiteResult], gpu: dict | None = None,
                 experiment: tuple[Path, dict] | None = None, load_test: dict | None = None):
        self.suites = suites
        self.gpu = gpu
        self.experiment = experiment  # (path, results.json of `srp4ctr experiment`) if found
        self.load_test = load_test  # RESULTS/load_test.json (bench/load_test.py) if found

    def measure(self, suite: str, provider: str, case: str,
                table: str | None = None) -> Measure | None:
        """The median of ``provider`` at ``case``: the interleaved one when the suite has it,
        else pytest-benchmark's."""
        res = self.suites.get(suite)
        if res is None:
            return None
        for row in res.interleaved:
            med = row.extra.get("medians_ms", {})
            if row.case == case and provider in med and (
                    table is None or row.extra.get("provider_tables", {}).get(provider) == table):
                return Measure(med[provider] / 1e3, "interleaved medians", row, res.smoke)
        for row in res.rows:
            if row.case == case and row.provider == provider and (table is None
                                                                  or row.table == table):
                return Measure(row.median_s, "medians", row, res.smoke)
        return None

    def row(self, suite: str, provider: str, case: str) -> Row | None:
        res = self.suites.get(suite)
        return next((r for r in res.rows if r.case == case and r.provider == provider),
                    None) if res else None

    def why_missing(self, suite: str, provider: str, case: str | None = None) -> str:
        """The recorded reason ``provider`` was not measured in ``suite``."""
        res = self.suites.get(suite)
        if res is None:
            return f"suite {suite} not run (no {suite}.json)"
        for row in res.interleaved:
            why = (row.extra.get("unavailable") or {}).get(provider)
            if why:
                return why
        want = {provider} | ({case.removeprefix("C=")} if case else set())
        for s in res.failed:
            if want <= _params(s["nodeid"]):
                return f"failed: {s.get('message', '')}"
        for s in res.skipped:
            if want <= _params(s["nodeid"]):
                return s.get("reason") or "skipped"
        hint = " (a smoke run measures the smallest shapes only)" if res.smoke else ""
        return f"no {provider} case at {case} in {suite}.json{hint}"

    def smoke_note(self, *measures: Measure | None) -> str:
        return " (smoke run: not a measurement)" if any(m and m.smoke for m in measures) else ""


# The metrics a goal can read. Each takes the context and the goal's parameters from goals.toml
# (keyword-only: a goal with a missing or unknown parameter is refused when the file is read).


def metric_speedup(ctx: Context, *, suite: str, fast: str | list[str], slow: list[str],
                   case: str, min_ratio: float, table: str | None = None,
                   accuracy_of: str | None = None, gpu_tower_fallback: bool = False) -> Verdict:
    """The fastest of ``fast`` is at least ``min_ratio`` times faster than the fastest of
    ``slow`` at ``case``. ``accuracy_of``: a provider whose recorded max abs diff the figure
    states; ``gpu_tower_fallback``: where that is not measured, the candidate-tower ratio of the
    GPU script is shown instead (still as "not measured")."""
    v = _speedup(ctx, suite, (fast,) if isinstance(fast, str) else fast, slow, case, min_ratio,
                 table, accuracy_of)
    if gpu_tower_fallback and v.status.startswith("not measured") and ctx.gpu:
        rows = {r.get("provider"): r for r in ctx.gpu.get("rows", [])
                if str(r.get("case", "")).startswith("tower")}
        ours = rows.get("ours + CUDA graph") or rows.get("ours (triton, fused)")
        eager = rows.get("eager torch")
        if ours and eager and ours.get("median_us") and eager.get("median_us"):
            ratio = eager["median_us"] / ours["median_us"]
            return Verdict(f"candidate tower only (bench/gpu_bench.py): {ratio:.2f}× vs "
                           "eager torch", "not measured: the whole request was not timed "
                           "on a GPU")
    return v


def _speedup(ctx: Context, suite: str, fasts: list[str], slow: list[str], case: str,
             min_ratio: float, table: str | None, accuracy_of: str | None) -> Verdict:
    got = [(p, ctx.measure(suite, p, case, table)) for p in fasts]
    got = [(p, m) for p, m in got if m]
    if not got:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, fasts[0], case))
    fp, fm = min(got, key=lambda pm: pm[1].seconds)
    slows = [(p, ctx.measure(suite, p, case, table)) for p in slow]
    missing = [p for p, m in slows if m is None]
    if missing:
        return Verdict(f"`{fp}` {fmt_ms(fm.seconds)} ms",
                       "not measured: " + ctx.why_missing(suite, missing[0], case))
    sp, sm = min(slows, key=lambda pm: pm[1].seconds)
    ratio = sm.seconds / fm.seconds
    fig = (f"`{fp}` {fmt_ms(fm.seconds)} ms vs `{sp}` {fmt_ms(sm.seconds)} ms: "
           f"{ratio:.2f}× ({fm.source}, {suite}, {case})")
    if accuracy_of is not None:
        row = ctx.row(suite, accuracy_of, case)
        diff = row.extra.get("max_abs_diff") if row else None
        fig += "" if diff is None else f"; max abs diff of probabilities vs fp32 {diff:.1e}"
    status = "met" if ratio >= min_ratio else "not met"
    return Verdict(fig, status + ctx.smoke_note(fm, sm))


NO_GPU = "no GPU result (bench/results/gpu_bench-*.json or the CUDA cases of bench_kernels.py)"


def _gpu_row(ctx: Context, case: str, provider: str) -> dict | None:
    """A row of the GPU script's JSON, or the kernels suite's CUDA case of the same name (with the
    fractions computed from that run's ceilings)."""
    names = {"ours": ("ours (triton)", "triton"), "sdpa": ("SDPA per user",
                                                           "SDPA batched over users", "sdpa")}
    if ctx.gpu:
        for r in ctx.gpu.get("rows", []):
            if r.get("case") == case and r.get("provider") in names[provider] \
                    and r.get("median_us") is not None:
                return {**r, "source": "bench/gpu_bench.py"}
    res = ctx.suites.get("kernels")
    if res:
        for r in res.rows:
            if r.device == "cuda" and r.case == case and r.provider in names[provider]:
                return {"median_us": r.median_s * 1e6, "frac_gemm": roofline_fraction(res, r),
                        "frac_copy": copy_fraction(res, r), "source": "bench_kernels.py",
                        "smoke": res.smoke}
    return None


def _no_gpu(ctx: Context) -> str:
    res = ctx.suites.get("kernels")
    reasons = {s.get("reason") for s in (res.skipped if res else []) if "cuda" in s["nodeid"]}
    return "not measured: " + NO_GPU + (f"; here: {min(reasons)}" if reasons else "")


def _smoke(r: dict) -> str:
    return " (smoke run: not a measurement)" if r.get("smoke") else ""


def _reported(smoke: bool) -> str:
    """The status of a goal that asks for a figure, not a threshold."""
    return "reported" + (" (smoke run: not a measurement)" if smoke else "")


def metric_gpu_vs_sdpa(ctx: Context, *, case: str, min_ratio: float) -> Verdict:
    """Our Triton kernel at least ``min_ratio`` times faster than SDPA at ``case`` (a case of
    the GPU script, or of the kernels suite's CUDA cases)."""
    ours, sdpa = _gpu_row(ctx, case, "ours"), _gpu_row(ctx, case, "sdpa")
    if not ours or not sdpa:
        return Verdict("—", _no_gpu(ctx))
    ratio = sdpa["median_us"] / ours["median_us"]
    return Verdict(f"ours {ours['median_us']:.1f} µs vs SDPA {sdpa['median_us']:.1f} µs: "
                   f"{ratio:.2f}× ({ours['source']})",
                   ("met" if ratio >= min_ratio else "not met") + _smoke(ours))


def metric_gpu_fraction(ctx: Context, *, case: str, key: str, min_fraction: float,
                        what: str) -> Verdict:
    """Our Triton kernel's ``key`` (``frac_gemm`` or ``frac_copy``: its fraction of the measured
    ceiling called ``what``) at least ``min_fraction`` at ``case``."""
    ours = _gpu_row(ctx, case, "ours")
    if not ours or ours.get(key) is None:
        return Verdict("—", _no_gpu(ctx))
    frac = ours[key]
    return Verdict(f"{fmt_pct(frac)} of the measured {what} ({ours['median_us']:.1f} µs, "
                   f"{ours['source']})", ("met" if frac >= min_fraction else "not met")
                   + _smoke(ours))


def metric_engine_vs_naive(ctx: Context, *, suite: str, provider: str, naive: str,
                           eager: str) -> Verdict:
    """Reported: at every case of ``suite``, ``provider``'s median and its ratios to ``naive``
    and to ``eager``."""
    res = ctx.suites.get(suite)
    if res is None:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, provider))
    parts, smoke = [], False
    for case in _ordered(sorted(res.rows, key=lambda r: r.x or 0), lambda r: r.case):
        eng, slow = ctx.measure(suite, provider, case), ctx.measure(suite, naive, case)
        folded = ctx.measure(suite, eager, case)
        if not eng:
            continue
        smoke |= eng.smoke
        bits = []
        if slow:
            bits.append(f"{slow.seconds / eng.seconds:.0f}× faster than naive")
        if folded:
            bits.append(f"{folded.seconds / eng.seconds:.2f}× vs eager folded")
        parts.append(f"{case}: {fmt_ms(eng.seconds)} ms, " + ", ".join(bits))
    if not parts:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, provider))
    return Verdict("; ".join(parts), _reported(smoke))


def metric_gemm_fractions(ctx: Context, *, suite: str, case: str, device: str,
                          dtypes: dict[str, str]) -> Verdict:
    """Reported: each provider's achieved FLOP rate at ``case`` and its fraction of the GEMM
    rate of its dtype (``dtypes``: provider -> dtype) measured in the same run."""
    bits, smoke = [], False
    for p, dtype in dtypes.items():
        m = ctx.measure(suite, p, case)
        res = ctx.suites.get(suite)
        if not m or res is None:
            continue
        flops = m.row.extra.get("flops_by_provider", {}).get(p) if m.row.extra.get(
            "interleaved") else m.row.flops
        gemm = res.ceiling(device, "gemm", dtype)
        if flops and gemm:
            smoke |= m.smoke
            rate = flops / m.seconds
            fp32 = res.ceiling(device, "gemm", "float32")
            if dtype != "float32" and fp32 and gemm < fp32:
                # no fast bf16 arithmetic on this CPU (torch's bf16 GEMM is slower than fp32):
                # the provider's bf16 mode computes in fp32, so the fp32 rate is its roofline
                bits.append(f"`{p}` {fmt_rate(rate)} = {fmt_pct(rate / fp32)} of the float32 GEMM "
                            f"rate ({fmt_rate(fp32)}; the {dtype} GEMM here is slower, "
                            f"{fmt_rate(gemm)})")
            else:
                bits.append(f"`{p}` {fmt_rate(rate)} = {fmt_pct(rate / gemm)} of the {dtype} "
                            f"GEMM rate ({fmt_rate(gemm)})")
    if not bits:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, next(iter(dtypes)), case))
    return Verdict("; ".join(bits), _reported(smoke))


def metric_latencies(ctx: Context, *, suite: str, providers: list[str], case: str) -> Verdict:
    """Reported: the medians of ``providers`` at ``case`` (else at the suite's last case)."""
    got = {p: ctx.measure(suite, p, case) for p in providers}
    if not any(got.values()):
        res = ctx.suites.get(suite)
        cases = _ordered(res.rows, lambda r: r.case) if res else []
        if cases:
            case = cases[-1]
            got = {p: ctx.measure(suite, p, case) for p in got}
    shown = [f"`{p}` {fmt_ms(m.seconds)} ms" for p, m in got.items() if m]
    if not shown:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, providers[0], case))
    smoke = any(m.smoke for m in got.values() if m)
    return Verdict(f"{case}: " + ", ".join(shown), _reported(smoke))


def metric_roofline_floor(ctx: Context, *, suite: str, providers: list[str], case: str,
                          device: str, max_ratio: float) -> Verdict:
    """The fastest of ``providers`` at ``case`` takes at most ``max_ratio`` times the sum of its
    floors: analytic FLOPs / the GEMM rate of its dtype + minimum bytes / the copy bandwidth,
    both measured on ``device`` in the same run."""
    res = ctx.suites.get(suite)
    rows = [r for r in (res.rows if res else []) if r.provider in providers and r.case == case]
    if not rows:
        return Verdict("—", "not measured: " + ctx.why_missing(suite, providers[0], case))
    r = min(rows, key=lambda r: r.median_s)
    gemm, bw = res.ceiling(device, "gemm", r.dtype), res.ceiling(device, "copy")
    if not gemm or not bw or not r.flops or not r.min_bytes:
        return Verdict(f"`{r.provider}` {fmt_ms(r.median_s)} ms",
                       f"not measured: no {device.upper()} ceilings in the same run")
    floor = r.flops / gemm + r.min_bytes / bw
    ratio = r.median_s / floor
    fig = (f"`{r.provider}` {r.median_s * 1e6:.0f} µs = {ratio:.1f}× the sum of its floors "
           f"({r.flops / gemm * 1e6:.1f} µs compute + {r.min_bytes / bw * 1e6:.1f} µs memory; "
           "the one launch the goal adds is not in this floor)")
    return Verdict(fig, ("met" if ratio <= max_ratio else "not met") + (
        " (smoke run: not a measurement)" if res.smoke else ""))


EXPERIMENT_JSON = Path("docs") / "results" / "ml-100k" / "results.json"


def find_experiment(results: Path) -> tuple[Path, dict] | None:
    """The committed MovieLens-100k experiment (``docs/results/ml-100k/results.json`` of the
    clone the results folder lives in, or of the working directory), if there is one."""
    for root in (Path(results).resolve().parent.parent, Path.cwd()):
        path = root / EXPERIMENT_JSON
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, ValueError):
                return None
    return None


def metric_experiment_time(ctx: Context, *, max_seconds: float, min_seeds: int) -> Verdict:
    """The committed experiment's wall time at most ``max_seconds``, over ``min_seeds`` or more
    seeds."""
    if ctx.experiment is None:
        return Verdict("—", f"not measured: no {EXPERIMENT_JSON} (run `srp4ctr experiment`)")
    path, r = ctx.experiment
    wall = r.get("wall_seconds_this_call")
    seeds = r.get("seeds", [])
    par = r.get("parallel", {})
    if wall is None:
        return Verdict("—", "not measured: the results file has no wall time")
    mi = r.get("machine", {})
    fig = (f"{wall / 60:.1f} min for {len(seeds)} seeds × {len(r.get('runs', {}))} models "
           f"(`{EXPERIMENT_JSON}`; {mi.get('cpu_count', '?')} CPUs, --jobs "
           f"{par.get('jobs', 1)}); one call — an interrupted, resumed run would show only its "
           "last part")
    ok = wall <= max_seconds and len(seeds) >= min_seeds
    return Verdict(fig, "met" if ok else "not met")


LOAD_TEST_JSON = "load_test.json"
NO_LOAD_TEST = f"not measured: no {LOAD_TEST_JSON} (run `python bench/load_test.py`)"


def load_load_test(results: Path) -> dict | None:
    """``results/load_test.json`` of ``bench/load_test.py``, if there is one."""
    try:
        doc = json.loads((Path(results) / LOAD_TEST_JSON).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("cases"), list) else None


def _load_case(ctx: Context, *, store: str = "memory", state: str = "warm",
               mode: str = "batching", clients: int, candidates: int) -> dict | None:
    return next((c for c in (ctx.load_test or {}).get("cases", [])
                 if (c.get("store"), c.get("state"), c.get("mode"), c.get("clients"),
                     c.get("candidates")) == (store, state, mode, clients, candidates)), None)


def _load_missing(ctx: Context, what: str) -> Verdict:
    return Verdict("—", NO_LOAD_TEST if ctx.load_test is None else
                   f"not measured: {LOAD_TEST_JSON} has no {what} case")


def metric_load_batching(ctx: Context, *, clients: int, candidates: int, min_ratio: float,
                         max_tail: float) -> Verdict:
    """The load test at ``clients`` and ``candidates`` (memory store, warm): batching's
    throughput over one-at-a-time scoring's, met at >= ``min_ratio`` with batching's p99 / p50
    <= ``max_tail``."""
    on = _load_case(ctx, clients=clients, candidates=candidates)
    off = _load_case(ctx, mode="one_at_a_time", clients=clients, candidates=candidates)
    if on is None or off is None:
        return _load_missing(ctx, f"{clients}-client, C = {candidates} batching / one-at-a-time")
    ratio, tail = on["rps"] / off["rps"], on["p99_ms"] / on["p50_ms"]
    fig = (f"{fmt_x(ratio)} ({on['rps']:.0f} vs {off['rps']:.0f} req/s); batching p99 / p50 "
           f"= {tail:.2f} ({on['p99_ms']:.0f} / {on['p50_ms']:.0f} ms); client "
           f"{ctx.load_test.get('client', 'httpx')}")
    return Verdict(fig, "met" if ratio >= min_ratio and tail <= max_tail else "not met")


def metric_load_health(ctx: Context, *, max_errors: int, max_rss_growth: float) -> Verdict:
    """Over every case of the load test: errors at most ``max_errors`` and the server's RSS
    growth below ``max_rss_growth``."""
    cases = (ctx.load_test or {}).get("cases", [])
    if not cases:
        return _load_missing(ctx, "any")
    errors = sum(c["errors"] for c in cases)
    growth = max(c["rss_growth"] for c in cases)
    fig = (f"{errors} errors in {sum(c['requests'] for c in cases)} requests over "
           f"{len(cases)} cases; largest RSS growth {fmt_pct(growth)}")
    return Verdict(fig, "met" if errors <= max_errors and growth < max_rss_growth else "not met")


def metric_load_overhead(ctx: Context, *, candidates: int, max_ms: float) -> Verdict:
    """The server's own time per request (its mean less the engine thread's, measured in the
    server) at 1 client, ``candidates`` candidates, memory store warm: met at <= ``max_ms``."""
    c = _load_case(ctx, clients=1, candidates=candidates)
    if c is None or c.get("server_overhead_ms") is None:
        return _load_missing(ctx, f"1-client C = {candidates} (with the engine time)")
    fig = (f"{c['server_overhead_ms']:.2f} ms (server mean {c['server_mean_ms']:.2f} ms less "
           f"the engine thread's {c['engine_mean_ms']:.2f} ms)")
    return Verdict(fig, "met" if c["server_overhead_ms"] <= max_ms else "not met")


def metric_load_store_share(ctx: Context, *, candidates: int, max_share: float) -> Verdict:
    """A warm Redis hit's share of the request (the store look-up's mean over the server's mean
    request) at 1 client and ``candidates``: met at <= ``max_share``."""
    c = _load_case(ctx, store="redis", clients=1, candidates=candidates)
    if c is None or c.get("store_get_share") is None:
        return _load_missing(ctx, f"1-client C = {candidates} Redis warm (with store timings)")
    fig = (f"{fmt_pct(c['store_get_share'])} (look-up {c['store_get_mean_ms']:.2f} ms of "
           f"{c['server_mean_ms']:.2f} ms)")
    return Verdict(fig, "met" if c["store_get_share"] <= max_share else "not met")


def load_test_lines(doc: dict | None) -> list[str]:
    """The load test's cases as a table (``bench/load_test.py``)."""
    lines = ["## Load test (`srp4ctr serve`)", ""]
    if doc is None:
        return lines + [f"Not run (no `{LOAD_TEST_JSON}`: `python bench/load_test.py`).", ""]
    mi = doc.get("machine", {})
    lines += [f"`bench/load_test.py` on {mi.get('cpu', '?')} ({mi.get('isa', '?')}, "
              f"{mi.get('cores', '?')} cores shared by the server and the client); client "
              f"{doc.get('client', 'httpx')}, {doc.get('duration_s', '?')} s per case, engine "
              f"threads {doc.get('server_threads', '?')}. Server mean: the request in the app "
              "(parsing to response); engine: the engine thread's time per engine call.", ""]
    rows = []
    for c in doc["cases"]:
        def ms(k):
            return f"{c[k]:.1f}" if c.get(k) is not None else "—"
        rows.append([f"{c['store']} {c['state']}", c["mode"].replace("_", " "),
                     str(c["candidates"]), str(c["clients"]), f"{c['rps']:.0f}", ms("p50_ms"),
                     ms("p95_ms"), ms("p99_ms"), ms("server_mean_ms"), ms("engine_mean_ms"),
                     f"{c['users_per_engine_call']:.2f}" if c.get("users_per_engine_call")
                     else "—", str(c["errors"]), fmt_pct(c["rss_growth"])])
    return lines + _table(["store", "scoring", "C", "clients", "req/s", "p50 ms", "p95 ms",
                           "p99 ms", "server mean ms", "engine ms / call", "users / call",
                           "errors", "RSS growth"], rows) + [""]


# goals.toml's ``metric`` -> the function that evaluates it
METRICS: dict[str, Callable[..., Verdict]] = {
    "speedup": metric_speedup,
    "gpu_vs_sdpa": metric_gpu_vs_sdpa,
    "gpu_fraction": metric_gpu_fraction,
    "engine_vs_naive": metric_engine_vs_naive,
    "gemm_fractions": metric_gemm_fractions,
    "latencies": metric_latencies,
    "roofline_floor": metric_roofline_floor,
    "experiment_time": metric_experiment_time,
    "load_batching": metric_load_batching,
    "load_health": metric_load_health,
    "load_overhead": metric_load_overhead,
    "load_store_share": metric_load_store_share,
}
GOALS_FILE = Path(__file__).with_name("goals.toml")


def load_goals(path: Path = GOALS_FILE) -> list[Goal]:
    """The goals of ``goals.toml``, in its order (the report's), each checked against its
    metric's parameters."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli (pytest depends on it there)
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise BenchError(f"reading {path.name} on Python 3.10 needs tomli: "
                             "pip install -e \".[bench,onnx]\" (or pip install tomli)") from None
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # TOMLDecodeError is a ValueError
        raise BenchError(f"cannot read the goals file {path}: {e}") from None
    goals: list[Goal] = []
    for n, entry in enumerate(doc.get("goal", []), 1):
        params = dict(entry)
        missing = [k for k in ("id", "issue", "text", "metric") if k not in params]
        if missing:
            raise BenchError(f"{path}: goal {n} has no {', '.join(missing)}")
        gid, issue, text, metric = (params.pop(k) for k in ("id", "issue", "text", "metric"))
        if metric not in METRICS:
            raise BenchError(f"{path}: goal {gid}: unknown metric {metric!r}; expected one of "
                             f"{', '.join(METRICS)}")
        try:
            inspect.signature(METRICS[metric]).bind(None, **params)
        except TypeError as e:
            raise BenchError(f"{path}: goal {gid} (metric {metric}): {e}") from None
        if any(g.id == gid for g in goals):
            raise BenchError(f"{path}: two goals with the id {gid}")
        goals.append(Goal(gid, int(issue), text, metric, params))
    return goals


def goal(goal_id: str) -> Goal:
    """The goal of ``goals.toml`` with this id."""
    for g in load_goals():
        if g.id == goal_id:
            return g
    raise KeyError(goal_id)


def evaluate_goals(ctx: Context, goals: list[Goal] | None = None) -> list[tuple[Goal, Verdict]]:
    out = []
    for g in goals or load_goals():
        try:
            v = g.evaluate(ctx)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            v = Verdict("—", f"not measured: the results could not be read ({e!r})")
        out.append((g, v))
    return out


def goals_section(verdicts: list[tuple[Goal, Verdict]]) -> list[str]:
    intro = ("Each performance goal of the issues, with the figure measured by these suites "
             "(or the GPU script) and whether it is met.")
    lines = ["## Goals", "", intro, ""]
    body = [[f"#{g.issue}", g.text, v.figure, f"**{v.status}**"] for g, v in verdicts]
    return lines + _table(["issue", "goal", "measured", "status"], body) + [""]


# ------------------------------------------------------------------------------------------ plots


def _plot_tables(suites: dict[str, SuiteResult]) -> list[tuple[str, str, list[Row]]]:
    """(suite, table, rows) of every table with at least two candidate counts."""
    out = []
    for name in SUITES:
        res = suites.get(name)
        if res is None:
            continue
        for table, rows in tables_of(res).items():
            if len({r.x for r in rows if r.x is not None}) >= 2:
                out.append((name, table, [r for r in rows if r.x is not None]))
    return out


def plot_latency(suites: dict[str, SuiteResult], path: Path) -> Path | None:
    """Median latency against the number of candidates, one line per provider, a panel per
    table; None when no table has two candidate counts."""
    panels = _plot_tables(suites)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.2 * nrows), squeeze=False)
    for ax, (suite, table, rows) in zip(axes.flat, panels):
        for provider in _ordered(rows, lambda r: r.provider):
            pts = sorted((r.x, r.median_s * 1e3) for r in rows if r.provider == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("candidates per request (C)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{suite}: {table}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def folded_vs_naive_points(suites: dict[str, SuiteResult]) -> dict | None:
    """What the folded-vs-naive plot draws: the analytic FLOPs per request of both ways (from the
    engine suite's recorded ``flops_user`` / ``flops_per_candidate``) and the measured medians of
    the whole-request providers by C; None without engine-suite rows."""
    res = suites.get("engine_cpu")
    if res is None:
        return None
    rows = [r for r in res.rows if r.x and "flops_user" in r.extra]
    if not rows:
        return None
    user, cand = rows[0].extra["flops_user"], rows[0].extra["flops_per_candidate"]
    whole = [r for r in rows if r.baseline == "eager_folded"]
    measured: dict[str, list[tuple[float, float]]] = {}
    for r in whole:
        measured.setdefault(r.provider, []).append((r.x, r.median_s))
    return {"user": user, "per_candidate": cand,
            "efficiency_flops": user + cand, "inference_flops_folded": user + 100 * cand,
            "inference_flops_naive": 100 * (user + cand),
            "measured": {p: sorted(v) for p, v in measured.items()},
            "max_c": max(r.x for r in rows)}


def _log_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes against the number of candidates, with grid and legend."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("candidates per request (C)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_folded_vs_naive(suites: dict[str, SuiteResult], path: Path) -> Path | None:
    pts = folded_vs_naive_points(suites)
    if pts is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    user, cand = pts["user"], pts["per_candidate"]
    cs = sorted({1, 10, 100, 1000, int(pts["max_c"]), *[int(10 ** (k / 4)) for k in range(17)]})
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4))
    a.plot(cs, [c * (user + cand) / 1e9 for c in cs], label="naive: C × (user + candidate)")
    a.plot(cs, [(user + c * cand) / 1e9 for c in cs], label="folded: user + C × candidate")
    a.scatter([1], [pts["efficiency_flops"] / 1e9], color="k", zorder=3)
    a.annotate(f"efficiency-FLOPs (C=1): {pts['efficiency_flops'] / 1e9:.3f} G",
               (1, pts["efficiency_flops"] / 1e9), textcoords="offset points", xytext=(6, 8),
               fontsize=8)
    for key, label in (("inference_flops_folded", "folded"), ("inference_flops_naive", "naive")):
        a.scatter([100], [pts[key] / 1e9], color="k", zorder=3)
        a.annotate(f"inference-FLOPs (C=100), {label}: {pts[key] / 1e9:.2f} G",
                   (100, pts[key] / 1e9), textcoords="offset points", xytext=(6, -12), fontsize=8)
    _log_axes(a, "GFLOP per request (analytic)", "cost per request: analytic FLOPs")
    for provider, values in pts["measured"].items():
        b.plot([v[0] for v in values], [v[1] * 1e3 for v in values], marker="o", label=provider)
    _log_axes(b, "median latency (ms)", "measured: whole request on CPU (engine suite)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- report


def _machine_lines(suites: dict[str, SuiteResult]) -> list[str]:
    newest = max(suites.values(), key=lambda r: r.date, default=None)
    if newest is None:
        return ["No suite results found."]
    m = newest.meta.get("machine", {})
    lines = [
        (f"- CPU: {m.get('cpu', '?')}"
         + (f" (vector instruction sets: {m['isa']})" if m.get("isa") else "")
         + f", {m.get('cores', '?')} cores visible; "
         f"{newest.meta.get('threads', m.get('threads', '?'))} threads for every provider "
         f"(torch and ONNX Runtime intra-op); OMP_WAIT_POLICY={m.get('omp_wait_policy')}"),
        (f"- torch {m.get('torch', '?')}, ONNX Runtime {m.get('onnxruntime') or 'not installed'}, "
         f"numpy {m.get('numpy', '?')}, Python {m.get('python', '?')}"),
        f"- {m.get('platform', '?')}" + (f", GPU: {m['gpu']}" if m.get("gpu") else ", no GPU"),
        (f"- load average (1 min) at the end of the run: {m.get('loadavg_1m', '?')} — the "
         "machine may be shared; compare ratios within one run"),
    ]
    return lines


def _ceiling_lines(suites: dict[str, SuiteResult]) -> list[str]:
    res = suites.get(CEILINGS) or next(iter(suites.values()), None)
    if res is None or not res.ceilings:
        return ["No ceilings measured (bench_ceilings.py not run): no roofline fractions.", ""]
    body = [[c["case"], c["device"], fmt_ms(c["median_s"]),
             fmt_rate(c["rate"], "B/s" if c["kind"] == "copy" else "FLOP/s")]
            for c in res.ceilings]
    intro = ("Measured in the same run as the suites, at the same thread count "
             f"(`{res.path.name}`, {res.date}):")
    return ([intro, ""]
            + _table(["ceiling", "device", "median ms", "rate"], body) + [""])


def _gpu_lines(gpu: tuple[Path, dict] | None) -> list[str]:
    lines = ["## GPU (bench/gpu_bench.py)", ""]
    if gpu is None:
        return [*lines, ("No GPU result under the results folder: nothing here was measured on "
                         "a GPU (`python bench/gpu_bench.py --out bench/results/` on a CUDA "
                         "machine writes one)."), ""]
    path, doc = gpu
    meta, ceil = doc.get("meta", {}), doc.get("ceilings", {})
    lines.append(f"`{path.name}`: {meta.get('gpu', '?')}, driver {meta.get('driver', '?')}, "
                 f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
                 f"{meta.get('date', '?')}. Ceilings: bf16 GEMM "
                 f"{ceil.get('gemm_bf16_tflops', float('nan')):.0f} TFLOP/s, copy "
                 f"{ceil.get('copy_gbps', float('nan')):.0f} GB/s.")
    checks = doc.get("correctness", [])
    if checks:
        bad = [c for c in checks if not c.get("ok")]
        lines.append(f"Correctness against the fp32 reference: {len(checks) - len(bad)}/"
                     f"{len(checks)} ok.")
    lines.append("")
    body = []
    for r in doc.get("rows", []):
        us = r.get("median_us")
        body.append([r.get("case", ""), r.get("provider", ""),
                     "—" if us is None else f"{us:.1f}",
                     "—" if r.get("tflops") is None else f"{r['tflops']:.1f}",
                     fmt_pct(r.get("frac_gemm")), fmt_pct(r.get("frac_copy")), r.get("note", "")])
    lines += _table(["case", "provider", "median µs", "TFLOP/s", "% GEMM", "% copy", "note"], body)
    return [*lines, ""]


def build_report(results: Path, out: Path, *, command: str | None = None,
                 plots: bool = True) -> Path:
    """Write ``out/report.md`` (and ``out/plots/*.png``) from the suite files under
    ``results``; returns the report's path."""
    results, out = Path(results), Path(out)
    suites, ignored = load_results(results)
    gpu = newest_gpu_result(results)
    load_test = load_load_test(results)
    ctx = Context(suites, gpu[1] if gpu else None, find_experiment(results), load_test)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    commands = _ordered((s.meta.get("command") for s in suites.values() if s.meta.get("command")),
                        lambda c: c)
    lines = ["# Benchmark report", ""]
    if any(s.smoke for s in suites.values()):
        lines += [("> **Smoke run**: one round per case and the smallest shapes. It checks "
                   "that the suites run; none of its figures is a measurement."), ""]
    lines += [f"Written {now} by `{command or 'srp4ctr bench --report-only'}` from the JSON "
              f"under `{_rel(results, out)}/`. Suites measured by: "
              + (", ".join(f"`{c}`" for c in commands) or "—") + ".", ""]
    pytest_commands = _ordered((s.meta.get("pytest_command") for s in suites.values()
                                if s.meta.get("pytest_command")), lambda c: c)
    lines += ["Sources:", ""]
    lines += [f"- `{s.path.name}`: run {s.date}" + (" (smoke)" if s.smoke else "")
              for s in suites.values()]
    lines += [f"- ignored (not written by `srp4ctr bench`): `{p.name}`" for p in ignored]
    lines += [f"- pytest ran: `{c}`" for c in pytest_commands]
    lines += ["", "## Machine", "", *_machine_lines(suites), "", "## Ceilings (the roofline)", ""]
    lines += _ceiling_lines(suites)
    lines += goals_section(evaluate_goals(ctx))
    drawn: list[tuple[str, Path | None]] = []
    if plots:
        try:
            drawn = [("Latency against the number of candidates",
                      plot_latency(suites, out / "plots" / "latency_vs_candidates.png")),
                     ("Folded vs naive: analytic cost per request and measured time",
                      plot_folded_vs_naive(suites, out / "plots" / "folded_vs_naive.png"))]
        except ImportError as e:
            lines += [f"Plots not drawn: matplotlib is not installed ({e}).", ""]
    if drawn:
        lines += ["## Plots", ""]
        for title, path in drawn:
            lines += ([f"![{title}]({_rel(path, out)})", ""] if path is not None else
                      [f"{title}: no data (needs a suite with two or more candidate counts).", ""])
    for name, title in SUITES.items():
        if name in suites:
            lines += suite_section(suites[name], title)
        else:
            lines += [f"## {title}", "", f"Not run (no `{name}.json` under the results folder).",
                      ""]
    lines += load_test_lines(load_test)
    lines += _gpu_lines(gpu)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:  # another drive
        return str(path)


# ------------------------------------------------------------------------------------ the command


def parse_suites(text: str | None) -> list[str]:
    """The suites to run, in report order (``ceilings`` always first)."""
    if not text:
        return list(RUNNABLE)
    names = [s.strip().removeprefix("bench_").removesuffix(".py") for s in text.split(",")]
    unknown = [n for n in names if n and n not in RUNNABLE]
    if unknown:
        raise BenchError(f"unknown suite(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(SUITES)}")
    return [CEILINGS] + [n for n in SUITES if n in names]


def run_suites(bench_dir: Path, suites: list[str], results: Path, *, smoke: bool, command: str,
               timeout_s: float | None = None) -> int:
    """Run ``suites`` in one pytest process with ``--benchmark-json``, then split the JSON into
    per-suite files under ``results``. Returns pytest's exit code."""
    for module, extra in (("pytest", "bench"), ("pytest_benchmark", "bench")):
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"srp4ctr bench needs {module}: pip install -e \".[{extra},onnx]\"")
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="srp4ctr-bench-json-") as tmp:
        raw = Path(tmp) / "run.json"
        files = [f"{bench_dir.name}/bench_{s}.py" for s in suites]
        cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds",
               "--benchmark-sort=name", "-o", "faulthandler_timeout=900"]
        env = dict(os.environ, SRP4CTR_BENCH_SMOKE="1" if smoke else "0")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        print("[srp4ctr bench] " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        try:
            proc = subprocess.run(cmd, cwd=bench_dir.parent, env=env, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the suites ran past --timeout-s {timeout_s:g} and were stopped; "
                             "no results were written") from None
        if not raw.is_file():
            raise BenchError(f"pytest wrote no benchmark JSON (exit code {proc.returncode}); "
                             "see its output above")
        split_run(raw, results, suites, command=command)
    return proc.returncode


def command_line(args) -> str:
    """The ``srp4ctr bench`` command that ``args`` stand for."""
    parts = ["srp4ctr", "bench"]
    if getattr(args, "suites", None):
        parts += ["--suites", args.suites]
    for flag in ("smoke", "report_only"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    for opt in ("out", "results", "bench_dir", "timeout_s"):
        value = getattr(args, opt, None)
        if value is not None:
            parts += ["--" + opt.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def cli_bench(args, bench_dir: Path) -> int:
    """``srp4ctr bench``: run the suites of ``bench_dir`` (unless ``--report-only``), then write
    the report."""
    command = command_line(args)
    if args.out:
        out = Path(args.out)
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="srp4ctr-bench-smoke-"))
    else:
        out = bench_dir
    results = Path(args.results) if args.results else out / "results"
    rc = 0
    if not args.report_only:
        rc = run_suites(bench_dir, parse_suites(args.suites), results, smoke=args.smoke,
                        command=command, timeout_s=args.timeout_s)
    elif not results.is_dir():
        raise BenchError(f"--report-only: no results folder {results}")
    report = build_report(results, out, command=command)
    print(f"[srp4ctr bench] wrote {report}" + (" (pytest reported failures: see the report)"
                                               if rc not in (0,) else ""))
    return 0 if rc == 0 else 1
