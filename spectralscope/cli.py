"""The ``spectralscope`` command line (SPEC §4). User mistakes print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .store import open_run, unit_dim

#: Per-layer metrics shown by ``info``, with the quantile taken where the metric has one.
INFO_METRICS: tuple[tuple[str, float | None], ...] = (
    ("momentum_sv", 0.5),
    ("ns_fail_frac", None),
    ("ns_polar_err", None),
    ("update_rms", None),
    ("update_erank", None),
    ("neuron_cv", None),
    ("weight_spectral_norm", None),
)


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def storage_options_arg(text: str | None) -> dict | None:
    """``--storage-options``: fsspec options for URLs, a JSON object (None when not given)."""
    import json

    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--storage-options must be a JSON object ({exc})") from exc
    if not isinstance(value, dict):
        raise UserError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def info_text(path: str, storage_options: dict | None = None) -> str:
    """The report of ``spectralscope info``: attributes, layers, steps and last values, as text tables."""
    from .integrity import run_status, stopped_note

    try:
        tree = open_run(path, storage_options, check="full")  # every chunk decoded once: damage is said, not met
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    except Exception as exc:  # a store broken in a way of its own: one line, never a traceback
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {exc})") from exc
    attrs = tree.attrs
    lines = [f"run        {path}"]
    for key in ("name", "status", "model_size", "created", "every", "steps"):
        if key == "status" and key in attrs:
            status = run_status(attrs)
            lines.append(f"{key:<10} {stopped_note(attrs) if status == 'stopped' else status}")
        elif key in attrs:
            lines.append(f"{key:<10} {attrs[key]}")
    for text in attrs.get("damaged", []):
        lines.append(f"{'damaged':<10} {text} (left out)")
    lines.append(f"{'optimizer':<10} {json.dumps(attrs.get('optimizer', {}))}")
    lines.append(f"{'meta':<10} {json.dumps(attrs.get('meta', {}))}")
    errors = attrs.get("errors", {})
    n_err = sum(sum(v.values()) for v in errors.values()) if isinstance(errors, dict) else 0
    lines.append(f"{'errors':<10} {n_err}" + (f"  {json.dumps(errors)}" if n_err else ""))
    budget = attrs.get("overhead")
    if isinstance(budget, dict):  # watch(overhead=...): what recording cost and the cadence it kept to
        cadence = ", ".join(f"{g} every {n}" for g, n in (budget.get("cadence") or {}).items())
        share = budget.get("achieved", budget.get("share"))  # "share": what runs of 2026-12-02 stored
        measured = f"{100 * share:.2f}%" if isinstance(share, (int, float)) else "not measured yet"
        lines.append(f"{'overhead':<10} budget {100 * budget.get('budget', float('nan')):.2f}% of training time, "
                     f"recording took {measured}; cadence x{budget.get('stretch')} ({cadence})")
    for family, note in (attrs.get("notes") or {}).items():  # what is NaN by construction, and why
        lines.append(f"{'note':<10} {family}: {note}")
    lines.append("")
    for name, node in tree.children.items():
        ds = node.dataset
        steps = ds["step"].values if "step" in ds.coords else np.array([])
        span = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps yet"
        lines.append(f"[{name}] {len(steps)} rows, {span}")
    if "optimizer" in tree.children:
        ds = tree["optimizer"].dataset
        table = pd.DataFrame(
            {
                "layer": ds["layer"].values.tolist(),
                "kind": ds["kind"].values.tolist(),
                "depth": ds["depth"].values,
                "shape": [f"{r}x{c}" for r, c in zip(ds["rows"].values, ds["cols"].values, strict=True)],
            }
        )
        if ds.sizes.get("step", 0):
            last = ds.isel(step=-1)
            for var, q in INFO_METRICS:
                if var not in last:
                    continue
                da = last[var].sel(quantile=q) if q is not None else last[var]
                table[f"{var}@q{q}" if q is not None else var] = da.values
            lines += ["", f"last recorded step: {int(ds['step'].values[-1])}"]
        if "sv_method" in ds.coords:  # how each layer's spectra were measured: exact, or the SLQ estimate
            table["spectra"] = [str(v) for v in ds["sv_method"].values]
        lines += ["", table.to_string(index=False, float_format=_fmt)]
    for group in ("activations", "gradients", "weights", "attention"):
        if group in tree.children and tree[group].dataset.sizes.get("step", 0):
            last = tree[group].dataset.isel(step=-1)
            if "bucket" in last.dims:  # per token-frequency bucket: the row of every token here
                last = last.sel(bucket="all")
            unit = unit_dim(last.dims)
            table = pd.DataFrame({unit: last[unit].values.tolist(), "kind": last["kind"].values.tolist()})
            for var, da in last.data_vars.items():
                if da.dims == (unit,):
                    table[var] = da.values
                elif da.dims == (unit, "head"):  # attention logits: the largest head's
                    table[f"{var} (top head)"] = da.max("head", skipna=True).values
            lines += ["", f"[{group}] last recorded step {int(last['step'].values)}",
                      table.to_string(index=False, float_format=_fmt)]
    for group in ("sharpness", "scalars"):
        if group in tree.children and tree[group].dataset.sizes.get("step", 0):
            last = tree[group].dataset.isel(step=-1)
            vals = ", ".join(f"{k}={_fmt(float(v.values))}" for k, v in last.data_vars.items() if v.dims == ())
            lines += ["", f"{group} at step {int(last['step'].values)}: {vals}"]
    return "\n".join(lines)


def window_arg(text: str | None):
    """``--window``: ``settled``, or two fractions ``LO,HI`` (default 0.5,1: the second half of each run)."""
    if text is None:
        return (0.5, 1.0)
    if text == "settled":
        return "settled"
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--window takes 'settled' or two fractions LO,HI (e.g. 0.5,1), got {text!r}") from None
    return (lo, hi)


def backtest_text(runs: Sequence[str], metric: str, quantile: float | None, size: str | None,
                  window: tuple[float, float] | str, each: bool, storage_options: dict | None = None) -> str:
    """``spectralscope fit --backtest``: refit without the largest size (or each in turn), the error of predicting
    it per group and quantile, whether it fell inside the 95% prediction interval, and the coverage."""
    from .fit import backtest

    try:
        table = backtest(list(runs), metric, quantile, size=size or "model_size", window=window, each=each,
                         storage_options=storage_options)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    held = ", ".join(f"{s:g}" for s in dict.fromkeys(table["held_out"]))
    per_q = table.groupby("quantile", dropna=False)["fold"].median()
    lines = [f"backtest of settled {metric}: refit without {'each size in turn' if each else 'the largest size'} "
             f"({held}) and predict it",
             table.drop(columns=[c for c in ("kind", "depth", "optimizer", "arch") if c in table.columns]).to_string(
                 index=False, float_format=_fmt),
             "", "median error (× either way) by quantile: " + ", ".join(
                 f"q{q:g} ×{v:.3g}" for q, v in per_q.items() if np.isfinite(v)),
             f"coverage: {int(table['inside'].sum())}/{len(table)} = {100 * table.attrs['coverage']:.0f}% of the "
             f"held-out values inside their 95% prediction interval"]
    return "\n".join(lines)


def _groups(rows, most: int = 6) -> tuple[int, str]:
    """How many distinct groups the fit-table ``rows`` hold, and "a, b, …" naming at most ``most`` of them."""
    groups = list(dict.fromkeys(rows["group"]))
    return len(groups), f"{', '.join(groups[:most])}{', …' if len(groups) > most else ''}"


def fit_text(runs: Sequence[str], metric: str, quantile: float | None, target_size: float | None,
             csv: str | None, storage_options: dict | None = None, size: str | None = None,
             window: tuple[float, float] | str = (0.5, 1.0)) -> str:
    """The report of ``spectralscope fit``: the power-law table against ``size`` (default model_size; width for a
    `derived` μP ratio, with its ``holds`` column), and the NS recommendation at ``target_size``."""
    from .derived import DERIVED, holds
    from .fit import INTERVAL_COLUMNS, fit_scaling, recommend_ns_steps

    size = size or ("width" if metric in DERIVED else "model_size")
    try:
        fits = fit_scaling(list(runs), metric=metric, quantile=quantile, storage_options=storage_options, size=size,
                           target_size=target_size, window=window)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    if metric in DERIVED:
        fits = holds(fits)
    if csv:
        fits.to_csv(csv, index=False)
    shown = fits.drop(columns=["intercept", *INTERVAL_COLUMNS])
    against = "model size" if size == "model_size" else size
    lines = [f"power laws of settled {metric} against {against} ({len(fits)} fits)"]
    if metric in DERIVED:
        lines.append(f"μP spectral condition: {metric} = {DERIVED[metric].text} holds where the exponent's 95% "
                     f"interval contains 0: {int(fits['holds'].sum())} of {len(fits)} groups")
    if fits.attrs.get("note"):
        lines.append(f"note: {fits.attrs['note']}")
    n, names = _groups(fits[fits["offset_gain"] > 2])
    if n:
        lines.append(f"offset favoured (AICc lower by more than 2 for y = A·x^b + c): {n} group(s) ({names}); the "
                     f"table's slopes are of the plain law (ss.power_law(x, y, offset=True) fits the other)")
    n, names = _groups(fits[~fits["settled"].astype(bool)])
    if n:
        lines.append(f"not settled: {n} group(s) still moving at the end of some run's window ({names}): their "
                     f"settled values are not yet final (--window settled fits each series' own settled records)")
    lines.append(shown.to_string(index=False, float_format=_fmt))
    if target_size is not None and size != "model_size":
        raise UserError("--target-size recommends NS steps for a model size; fit against --size model_size")
    if target_size is not None:
        q = quantile if quantile is not None else 0.5
        if metric not in ("momentum_sv",):
            raise UserError("--target-size recommends NS steps from momentum_sv fits; use --metric momentum_sv")
        try:
            rec = recommend_ns_steps(fits, target_size, quantile=q)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        lines += ["", f"Newton–Schulz steps for a model of {target_size:g} parameters (σ at q={q} ≥ the 0.5 floor; "
                      "conservative: for the lower end of σ's 95% prediction interval)",
                  rec.to_string(index=False, float_format=_fmt)]
        if rec.attrs.get("note"):
            lines.append(f"note: {rec.attrs['note']}")
    if csv:
        lines += ["", f"fit table written to {csv}"]
    return "\n".join(lines)


def dashboard_command(runs_dir: str, host: str, port: int) -> list[str]:
    """The ``streamlit run`` command line that serves the dashboard on ``runs_dir``; the folder itself is
    passed in the environment (``SPECTRALSCOPE_RUNS_DIR``), see `dashboard_env`."""
    from pathlib import Path

    from .store import is_url

    if not (0 < port < 65536):
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    if not is_url(runs_dir) and not Path(runs_dir).is_dir():
        raise UserError(f"runs folder {runs_dir} does not exist or is not a folder")
    import importlib.util

    try:
        import plotly  # noqa: F401
        import streamlit  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the dashboard needs streamlit and plotly ({exc}); pip install 'spectralscope'") from exc
    # found, not imported: importing the app would run its Streamlit calls here, outside a server
    # ("missing ScriptRunContext" warnings at start-up)
    app = importlib.util.find_spec("spectralscope.dashboards.app").origin
    return [sys.executable, "-m", "streamlit", "run", app, "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.runOnSave", "false", "--server.fileWatcherType", "none", "--global.developmentMode", "false"]


def dashboard_env(runs_dir: str, storage_options: str | None = None) -> dict[str, str]:
    """The server's environment: the runs folder (``SPECTRALSCOPE_RUNS_DIR``, a resolved path or the URL)
    and, for a URL, the fsspec options as JSON (``SPECTRALSCOPE_STORAGE_OPTIONS``)."""
    import json
    import os
    from pathlib import Path

    from .store import is_url

    env = {**os.environ, "SPECTRALSCOPE_RUNS_DIR": runs_dir if is_url(runs_dir) else str(Path(runs_dir).resolve())}
    options = storage_options_arg(storage_options)
    if options is not None:
        env["SPECTRALSCOPE_STORAGE_OPTIONS"] = json.dumps(options)
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectralscope", description="Spectral diagnostics of PyTorch training.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a run's attributes, layers, steps and last values")
    info.add_argument("run", help="path or URL of a run store (…/name.zarr)")
    info.add_argument("--storage-options", default=None, help="fsspec options for a URL, as a JSON object")
    demo = sub.add_parser("demo", help="train sweeps of small GPTs with Muon, AdamW and NorMuon; record, fit, "
                                       "compare and recommend")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--optimizers", nargs="+", default=["muon", "adamw", "normuon"],
                      help="optimizers of the hidden matrices: muon, adamw, normuon (default: all three)")
    demo.add_argument("--sweep", choices=["width", "ffn"], default="width",
                      help="width: the model width (FFN 4×); ffn: the FFN width at --width")
    demo.add_argument("--widths", type=int, nargs="+", default=[32, 48, 64, 96])
    demo.add_argument("--width", type=int, default=64, help="the model width of --sweep ffn")
    demo.add_argument("--ffn", type=int, nargs="+", default=[1, 2, 4, 8],
                      help="FFN width / model width of --sweep ffn")
    demo.add_argument("--depth", type=int, default=4)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--data", default="text", help="text (stdlib docs, default), pcfg, or a UTF-8 file")
    demo.add_argument("--imbalance", type=float, default=1.0,
                      help="with --data pcfg: Zipf exponent of the word frequencies (0 = balanced)")
    demo.add_argument("--target-size", type=float, default=None, help="default: 10× the largest model")
    demo.add_argument("--jobs", type=int, default=None,
                      help="runs trained at once, each in its own process on cores // jobs torch threads "
                           "(default: one per usable core while each has 1 GiB of available memory; 1 trains in this "
                           "process at torch's default threads)")
    dash = sub.add_parser("dashboard", help="serve the live dashboard of the runs under a folder")
    dash.add_argument("runs_dir", nargs="?", default="runs",
                      help="folder or fsspec URL (s3://bucket/runs) searched for run stores (default: runs)")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--storage-options", default=None,
                      help="fsspec options for a URL, as JSON: '{\"client_kwargs\": {\"endpoint_url\": \"http://…\"}}'")
    tb = sub.add_parser("export-tb", help="write a run's main metrics to TensorBoard")
    tb.add_argument("run")
    tb.add_argument("--logdir", required=True)
    fit = sub.add_parser("fit", help="fit power laws of settled spectra against model size")
    fit.add_argument("runs", nargs="+", help="run stores or globs (quote globs: 'runs/*.zarr')")
    fit.add_argument("--metric", default="momentum_sv")
    fit.add_argument("--quantile", type=float, default=None, help="one quantile level (default: every recorded one)")
    fit.add_argument("--target-size", type=float, default=None, help="recommend NS steps for this model size")
    fit.add_argument("--csv", default=None, help="also write the fit table to this CSV file")
    fit.add_argument("--backtest", action="store_true",
                     help="refit without the largest size and report the error of predicting it, and the coverage")
    fit.add_argument("--each", action="store_true", help="with --backtest: hold out each size in turn")
    fit.add_argument("--window", default=None,
                     help="which records give a run's settled value: LO,HI fractions (default 0.5,1) or 'settled' "
                          "(each series from where it settled)")
    fit.add_argument("--size", default=None,
                     help="fit against this run attribute (root or meta): model_size (default), width, ffn_width; "
                          "the μP ratios mup_weight_ratio/mup_update_ratio default to width")
    fit.add_argument("--storage-options", default=None, help="fsspec options for URLs, as a JSON object")
    doctor = sub.add_parser("doctor", help="print a run's health alerts with what to do; exit 1 on a critical one")
    doctor.add_argument("run")
    doctor.add_argument("--storage-options", default=None, help="fsspec options for a URL, as a JSON object")
    report = sub.add_parser("report", help="compare optimizers across runs: a self-contained report.html")
    report.add_argument("runs", nargs="+", help="run stores, globs, or folders holding them (runs/demo)")
    report.add_argument("-o", "--output", default="report.html")
    report.add_argument("--swept", default=None,
                        help="the size activation ranks are fitted against: width, ffn_width or model_size "
                             "(default: from the runs' meta)")
    report.add_argument("--csv", default=None, help="also write the full tables as CSV files into this folder")
    return p


def report_runs(items: Sequence[str]) -> list[str]:
    """Run stores named by paths, globs or folders holding them (searched as the dashboard searches its runs
    folder, `dashboards.data.find_runs`; a store there that is not a readable run is said on stderr and left out)."""
    from .dashboards.data import find_runs
    from .store import expand_runs

    runs: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not (p / "zarr.json").exists():
            entries = find_runs(p)
            for e in entries:
                if not e.ok:
                    print(f"spectralscope report: skipped {e.rel}: {e.problem}", file=sys.stderr)
            found = [str(e.path) for e in entries if e.ok]
        else:
            found = expand_runs(item)
        if not found:
            raise UserError(f"no run store matches {item!r}")
        runs += found
    return runs


#: The exit status of a command whose reader closed its output early (``… | head``): a shell's for SIGPIPE.
CLOSED_PIPE = 128 + 13


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _command(argv)
        sys.stdout.flush()  # a closed pipe is found here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader (head, less) has what it wanted: stop quietly, and let the exit flush write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return CLOSED_PIPE


def _command(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "info":
            try:
                text = info_text(args.run, storage_options_arg(args.storage_options))
            except UserError:
                raise
            except Exception as exc:  # info reports on a store: whatever is wrong with it is said in one line
                raise UserError(f"{args.run} cannot be read ({type(exc).__name__}: {exc})") from exc
            print(text)
        elif args.command == "demo":
            from .demo import DemoConfig, run_demo

            try:
                cfg = DemoConfig(out=args.out, optimizers=args.optimizers, sweep=args.sweep, widths=args.widths,
                                 width=args.width, ffn=args.ffn, depth=args.depth, steps=args.steps, data=args.data,
                                 imbalance=args.imbalance, target_size=args.target_size, jobs=args.jobs)
                print(run_demo(cfg))
            except ValueError as exc:
                raise UserError(str(exc)) from exc
        elif args.command == "export-tb":
            from .tensorboard import export_tb

            try:
                n, skipped = export_tb(args.run, args.logdir)
            except (FileNotFoundError, ValueError) as exc:
                raise UserError(str(exc)) from exc
            print(f"wrote {n} scalars of {args.run} to {args.logdir}"
                  + (f" ({skipped} were there already)" if skipped else ""))
        elif args.command == "dashboard":
            cmd = dashboard_command(args.runs_dir, args.host, args.port)
            env = dashboard_env(args.runs_dir, args.storage_options)
            print(f"spectralscope dashboard: serving {args.runs_dir} on http://{args.host}:{args.port} (Ctrl-C stops)",
                  flush=True)
            # become the server: signals (Ctrl-C, a supervisor's SIGTERM) reach Streamlit itself, no orphan left
            os.execve(cmd[0], cmd, env)
        elif args.command == "doctor":
            from .doctor import report as doctor_report

            try:
                tree = open_run(args.run, storage_options_arg(args.storage_options))
            except (FileNotFoundError, ValueError) as exc:
                raise UserError(str(exc)) from exc
            text, code = doctor_report(tree, args.run)
            print(text)
            return code
        elif args.command == "fit" and args.backtest:
            print(backtest_text(args.runs, args.metric, args.quantile, args.size, window_arg(args.window), args.each,
                                storage_options_arg(args.storage_options)))
        elif args.command == "fit":
            print(fit_text(args.runs, args.metric, args.quantile, args.target_size, args.csv,
                           storage_options_arg(args.storage_options), args.size, window_arg(args.window)))
        elif args.command == "report":
            from .compare import comparison
            from .report import write_report

            try:
                c = comparison(report_runs(args.runs), swept=args.swept)
            except (ValueError, KeyError, FileNotFoundError) as exc:
                raise UserError(str(exc)) from exc
            if args.csv:
                c.write_csv(args.csv)
            print(f"wrote {write_report(c, args.output)} ({len(c.runs)} runs, optimizers "
                  f"{', '.join(dict.fromkeys(c.per_run['optimizer']))}, swept {c.swept})")
        return 0
    except UserError as exc:
        print(f"spectralscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
