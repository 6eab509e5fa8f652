"""The one report command, for any machine (make report):

    python -m benchmarks.report [--stage build,tests,peaks,ops,e2e,breakdown,plot] [--quick]
                                [--dir REPORT_DIR] [--budget SECONDS] [--check [--archive FILE]]

writes REPORT_DIR/report.md (default benchmarks/results/<date>-<machine>) with the machine,
versions, measured peaks, every op's and end-to-end result with its fraction of peak and its
ratio to every baseline, the time breakdown, the 1000-step projection, the goals and the
speed-up plot. Stages run in the order given and each re-renders the report; `--stage render`
only re-renders. --budget stops starting benchmarks after that many seconds (a 10-minute GPU
lease: give ~480); a benchmark stage run again into the same folder resumes where it stopped,
--fresh measures it anew. --check is make gpu-check (check.py): stages env, build, tests,
ops, e2e by default, each under a hard cap. Exits non-zero when a stage found a problem.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import analysis, check, stages
from benchmarks.report.environment import default_report_dir, environment, fresh_environment, load_average
from benchmarks.report.render import environment_line, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", action="append", default=[],
                        help=f"comma-separated, repeatable: {', '.join(stages.ALL)} or render "
                             "(default: all that apply)")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' --quick sizes")
    parser.add_argument("--fresh", action="store_true",
                        help="measure the benchmark stages anew (default: resume, skipping what the folder holds)")
    parser.add_argument("--dir", default=os.environ.get("REPORT_DIR") or None, help="report folder (env REPORT_DIR)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("REPORT_BUDGET") or 0) or None,
                        help="seconds after which no benchmark starts (env REPORT_BUDGET)")
    parser.add_argument("--check", action="store_true",
                        help="make gpu-check: its stages, tests and sizes, a time cap on each stage")
    parser.add_argument("--archive", type=Path, help="with --check: keep a .tar.gz of the folder up to date here")
    args = parser.parse_args(argv)
    import torch
    on_gpu = torch.cuda.is_available()
    default = check.STAGES if args.check else stages.default_stages(on_gpu)
    names = [n for arg in args.stage for n in arg.split(",") if n] or list(default)
    unknown = sorted(set(names) - set(stages.ALL) - {"render"})
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(stages.ALL)}, render")

    report_dir = Path(args.dir).resolve() if args.dir else default_report_dir()
    report_dir.mkdir(parents=True, exist_ok=True)
    meta_path = report_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"stages": {}}
    env = environment()
    meta.setdefault("environment", env)  # as the folder's first stage found it; each stage notes its own commit
    quick = args.quick or (args.check and not on_gpu)  # a check rehearsed on a CPU: the --quick sizes
    meta.setdefault("quick", quick)
    meta["check"] = args.check
    head = env["commit"]
    commit = head.split()[0][:12] + (" + uncommitted changes" if "uncommitted" in head else "")
    deadline = time.time() + args.budget if args.budget else None
    ctx = stages.Context(report_dir, quick, args.fresh, deadline, on_gpu, args.check)
    with check.Archive(report_dir, args.archive.resolve() if args.archive else None) as archive:
        failed = _run_stages([n for n in names if n != "render"], ctx, meta, commit, archive)
    print(f"[report] written to {report_dir / 'report.md'}")
    return 1 if failed else 0


def _run_stages(names: list[str], ctx: stages.Context, meta: dict, commit: str, archive: check.Archive) -> bool:
    """Each stage in turn, re-rendering the report after each; True when one found a problem."""
    import torch
    failed = False
    for name in names:
        print(f"[report] stage {name} (load average {load_average()})", flush=True)
        start, before = time.perf_counter(), load_average()
        ctx.cap_until = time.time() + check.cap_s(name) if ctx.check and name in check.CAPS_S else None
        problems = stages.run(name, ctx)
        meta["stages"][name] = dict(seconds=time.perf_counter() - start, load_before=before, load_after=load_average(),
                                    problems=problems, commit=commit, threads=torch.get_num_threads(),
                                    when=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
        if name == "build":  # it installs the carried wheels: the versions the later stages run with
            try:
                meta["environment"] = fresh_environment()
            except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
                problems.append(f"the environment could not be read again after the build: {error}")
        failed |= bool(problems)
        for problem in problems:
            print(f"[report]   {problem}", flush=True)
        log = ctx.report_dir / f"{name}.log"
        if problems and log.exists():  # CI shows no files: the log's end here
            print("".join(log.read_text().splitlines(keepends=True)[-40:]), flush=True)
        print(f"[report]   took {meta['stages'][name]['seconds']:.1f} s", flush=True)
        if name == "env":
            print("[report]   " + environment_line(meta["environment"], analysis.peaks(analysis.load(ctx.report_dir))),
                  flush=True)
        _write(ctx.report_dir, meta)
        archive.update()
    _write(ctx.report_dir, meta)
    return failed


def _write(report_dir: Path, meta: dict) -> None:
    (report_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    (report_dir / "report.md").write_text(render(report_dir))


if __name__ == "__main__":
    sys.exit(main())
