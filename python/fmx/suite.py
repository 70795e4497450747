"""The suite: real transformers architectures as task packs, and how far fmx gets on each.

`examples/suite/` holds one small config per model type (a few layers, hidden
sizes of 32, a vocabulary of 128): causal LMs, encoders, encoder-decoders,
vision and audio models, mixture-of-experts, sliding/global attention,
fused-qkv layouts, parallel residuals, ALiBi, partial rotary. With
transformers importable,

    fmx suite -o packs [--only llama,bert] [--check] [--json FILE]

exports each config (`fmx export --hf-config CONFIG`, random sensitive weights)
into `packs/<model_type>`, which `fmx serve --tasks packs` serves. With
`--check` it also writes each pack's whole model with the tracer (`fmx trace`),
verifies that file on every probe (`fmx verify --probes all`), runs it in plain
Python on the first probe, and prints a table (export, trace, verify, run,
traced LOC, seconds) with the share of model types that passed every step.
bench/suite.sh runs it over the whole suite for the README's table.

This is not the exporter (export.py, hf.py) nor the tracer (tracer.py): it
calls them. Without transformers it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE_DIR = os.path.join(ROOT, "examples", "suite")
STEPS = ("export", "trace", "verify", "run")


def configs(folder: str = SUITE_DIR, only: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """model type -> its config file, in name order (`only`: those names, each must exist)."""
    found = {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(glob.glob(os.path.join(folder, "*.json")))}
    if only:
        missing = [n for n in only if n not in found]
        if missing:
            raise ValueError(f"no config for {', '.join(missing)} in {folder} (have: {', '.join(found)})")
        found = {n: found[n] for n in only}
    return found


def export_one(config: str, out: str, *, quiet: bool = True, **options: Any) -> None:
    """`fmx export --hf-config CONFIG --random-init -o OUT --force` in this process."""
    from .export import build_from_hf, export

    model, inputs_fn = build_from_hf(None, config, True, {})
    source = {"kind": "hf", "path": os.path.relpath(config, ROOT) if config.startswith(ROOT) else config,
              "random_init": True, "overrides": {}}
    export(model, out, source=source, init=True, inputs_fn=inputs_fn, quiet=quiet, force=True, **options)


def run_plain(pack: str, code: str) -> Optional[str]:
    """Runs the traced file as plain Python on the pack's first probe and compares its first
    output with the model's; None when it matches, else why not."""
    import torch

    from .safetensors import load_file

    with open(os.path.join(pack, "task.json"), encoding="utf-8") as f:
        task = json.load(f)
    weights = load_file(os.path.join(pack, "weights.safetensors"))
    for alias, stored in ((task.get("weights") or {}).get("aliases") or {}).items():
        weights[alias] = weights[stored]
    probes = load_file(os.path.join(pack, "probes.safetensors"))
    call = next(c for c in task["calls"] if c["probe"] == 0 and c["module"] == "")
    given = {e["name"]: probes[e["key"]] for e in call["inputs"] if e["kind"] == "tensor"}
    scope: Dict[str, Any] = {}
    exec(compile(code, os.path.join(pack, "traced.py"), "exec"), scope)  # noqa: S102 - our own tracer's file
    forward = scope["forward"]
    args = {}
    for name in inspect.signature(forward).parameters:
        if name == "weights":
            args[name] = weights
        elif name in given:
            args[name] = given[name]
    with torch.no_grad():
        got = forward(**args)
    got = got[0] if isinstance(got, (tuple, list)) else got
    out = next((e for e in call["outputs"] if e["kind"] == "tensor"), None)
    if out is None:
        return "the model returned no tensor"
    want = probes[out["key"]]
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {list(got.shape)}, the model's {list(want.shape)}"
    scale = float(want.float().pow(2).mean().sqrt()) or 1.0
    err = float((got.float() - want.float()).abs().max())
    return None if err <= 1e-4 * scale + 1e-6 else f"max abs error {err:.3g} (output rms {scale:.3g})"


def _loc(code: str) -> int:
    """Non-blank lines that are not imports, comments or the docstring."""
    lines = [ln.strip() for ln in code.splitlines()]
    return sum(1 for ln in lines[1:] if ln and not ln.startswith(("#", "import ", "from ")))


def check(name: str, config: str, out: str, options: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Export, trace and the plain-Python run of one model type, in this process; the row of the
    table, to which `verify` adds its column."""
    from .export import ExportError
    from .tracer import TracerError, write_pack

    row: Dict[str, Any] = {"model_type": name}
    pack = os.path.join(out, prefix + name)
    row["pack"] = pack
    t0 = time.perf_counter()
    try:
        export_one(config, pack, **options)
    except ExportError as e:
        row["export"] = f"refused: {e}"
        return row
    except Exception as e:  # noqa: BLE001 - a model fmx cannot run yet: the table says why
        row["export"] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        return row
    row["export"] = "ok"
    row["export_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    try:
        code, warnings = write_pack(pack)
    except TracerError as e:
        row["trace"] = f"refused: {e}"[:300]
        return row
    except Exception as e:  # noqa: BLE001
        row["trace"] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
        return row
    row["trace_s"] = round(time.perf_counter() - t0, 2)
    row["trace"] = "ok" if not warnings else "warning: " + "; ".join(warnings)[:300]
    row["loc"] = _loc(code)
    with open(os.path.join(pack, "traced.py"), "w", encoding="utf-8") as f:
        f.write(code)
    try:
        why = run_plain(pack, code)
        row["run"] = "ok" if why is None else f"mismatch: {why}"
    except Exception as e:  # noqa: BLE001
        row["run"] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
    return row


def verify(row: Dict[str, Any], fmx: str) -> Dict[str, Any]:
    """`fmx verify PACK traced.py --probes all` for a row whose trace was written (a subprocess:
    rows may be verified side by side)."""
    if "loc" not in row:
        return row
    pack = row["pack"]
    t0 = time.perf_counter()
    res = subprocess.run([fmx, "verify", pack, os.path.join(pack, "traced.py"), "--probes", "all", "--json"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    row["verify_s"] = round(time.perf_counter() - t0, 2)
    try:
        report = json.loads(res.stdout)
        row["verify"] = ("ok" if report.get("status") == "match" else
                         f"{report.get('status')}: {report.get('passed')}/{report.get('graded')} probe calls"
                         + (f", {report['error'].get('stage')}: {report['error'].get('message')}"
                            if report.get("error") else "")
                         + (f", first divergence {report['first_divergence'].get('name')}"
                            if report.get("first_divergence") else ""))[:300]
    except ValueError:
        row["verify"] = f"error: {(res.stderr or res.stdout).strip()[:300]}"
    return row


def check_all(chosen: Dict[str, str], out: str, fmx: str, jobs: int = 4, options: Optional[Dict[str, Any]] = None,
              progress: Optional[Callable[[Dict[str, Any]], None]] = None, prefix: str = "") -> List[Dict[str, Any]]:
    """Every step on every model type: exports one after the other in this process (the op trace
    patches torch), `fmx verify` runs `jobs` at a time meanwhile. Rows in `chosen`'s order."""
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = []
        for name, config in chosen.items():
            row = check(name, config, out, dict(options or {}), prefix)
            futures.append(pool.submit(verify, row, fmx))
            rows.append(row)
        for f in futures:
            row = f.result()
            if progress is not None:
                progress(row)
    return rows


def passed(row: Dict[str, Any]) -> bool:
    return all(row.get(s) == "ok" for s in STEPS)


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table of the rows and the share that passed every step."""
    out = ["| model type | export | trace | verify (all probes) | plain Python | traced LOC | export s | trace s | verify s |",
           "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [r["model_type"]] + [(r.get(s) or "—").replace("|", "/") for s in STEPS]
        cells += [str(r.get("loc", "—"))] + [f"{r[k]:.1f}" if k in r else "—" for k in ("export_s", "trace_s", "verify_s")]
        out.append("| " + " | ".join(cells) + " |")
    n = sum(1 for r in rows if passed(r))
    out.append(f"\n{n} of {len(rows)} model types ({100 * n / max(1, len(rows)):.0f}%) passed export, trace, "
               "verify on every probe and the plain-Python run.")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="fmx suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="folder for the packs (one per model type)")
    ap.add_argument("--configs", default=SUITE_DIR, help=f"folder of config.json files (default {SUITE_DIR})")
    ap.add_argument("--only", help="comma-separated model types (default: every config)")
    ap.add_argument("--check", action="store_true",
                    help="also trace, verify on every probe and run in plain Python; print the table")
    ap.add_argument("--json", metavar="FILE", help="with --check: write the rows as JSON here")
    ap.add_argument("--prefix", default="", help="pack names are PREFIX + model type (e.g. hf-: hf-llama)")
    ap.add_argument("--jobs", type=int, default=4, help="with --check: verifies run side by side (default 4)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    from . import hf

    if not hf.available():
        print("fmx suite: transformers is not importable (put ../shared/pydeps or an installed transformers on "
              "PYTHONPATH, or set FMX_PYDEPS)", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()  # (their deprecation notes, not fmx's)
    try:
        chosen = configs(args.configs, [n for n in (args.only or "").split(",") if n] or None)
    except ValueError as e:
        print(f"fmx suite: {e}", file=sys.stderr)
        return 2
    if not chosen:
        print(f"fmx suite: no config.json files in {args.configs}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    fmx = os.environ.get("FMX_BIN", "fmx")
    t0 = time.perf_counter()

    def progress(row: Dict[str, Any]) -> None:
        if not args.quiet:
            ok = passed(row) if args.check else row["export"] == "ok"
            detail = "ok" if ok else next(f"{s}: {row[s]}" for s in STEPS if row.get(s, "ok") != "ok")
            print(f"fmx suite: {row['model_type']}: {detail} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
                  flush=True)

    if args.check:
        rows = check_all(chosen, args.out, fmx, args.jobs, progress=progress, prefix=args.prefix)
        failed = sum(1 for r in rows if not passed(r))
    else:
        from .export import ExportError

        rows = []
        for name, config in chosen.items():
            row = {"model_type": name}
            try:
                export_one(config, os.path.join(args.out, args.prefix + name))
                row["export"] = "ok"
            except ExportError as e:
                row["export"] = f"refused: {e}"
            except Exception as e:  # noqa: BLE001
                row["export"] = f"failed: {type(e).__name__}: {e}".splitlines()[0][:300]
            rows.append(row)
            progress(row)
        failed = sum(1 for r in rows if r["export"] != "ok")
    if args.check:
        print(table(rows))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump([{k: v for k, v in r.items() if k != "pack"} for r in rows], f, indent=1)
    elif not args.quiet:
        print(f"fmx suite: {len(rows) - failed} of {len(rows)} packs in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
