"""The one report command, for any machine (make report):

    python -m benchmarks.report [--stage build,tests,peaks,ops,e2e,breakdown,plot] [--quick]
                                [--dir REPORT_DIR] [--budget SECONDS]

writes REPORT_DIR/report.md (default benchmarks/results/<date>-<machine>) with the machine,
versions, measured peaks, every op's and end-to-end result with its fraction of peak and its
ratio to every baseline, the time breakdown, the 1000-step projection, the goals and the
speed-up plot. Stages run in the order given and each re-renders the report; `--stage render`
only re-renders. --budget stops starting benchmarks after that many seconds (a 10-minute GPU
lease: give ~480); a benchmark stage run again into the same folder resumes where it stopped,
--fresh measures it anew. Exits non-zero when a stage found a problem.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.report import stages
from benchmarks.report.environment import default_report_dir, environment, load_average
from benchmarks.report.render import render


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
    args = parser.parse_args(argv)
    import torch
    on_gpu = torch.cuda.is_available()
    names = [n for arg in args.stage for n in arg.split(",") if n] or list(stages.default_stages(on_gpu))
    unknown = sorted(set(names) - set(stages.ALL) - {"render"})
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {', '.join(stages.ALL)}, render")

    report_dir = Path(args.dir).resolve() if args.dir else default_report_dir()
    report_dir.mkdir(parents=True, exist_ok=True)
    meta_path = report_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"stages": {}}
    env = environment()
    meta.setdefault("environment", env)  # as the folder's first stage found it; each stage notes its own commit
    meta.setdefault("quick", args.quick)
    head = env["commit"]
    commit = head.split()[0][:12] + (" + uncommitted changes" if "uncommitted" in head else "")
    deadline = time.time() + args.budget if args.budget else None
    ctx = stages.Context(report_dir, args.quick, args.fresh, deadline, on_gpu)
    failed = False
    for name in (n for n in names if n != "render"):
        print(f"[report] stage {name} (load average {load_average()})", flush=True)
        start, before = time.perf_counter(), load_average()
        problems = stages.run(name, ctx)
        meta["stages"][name] = dict(seconds=time.perf_counter() - start, load_before=before, load_after=load_average(),
                                    problems=problems, commit=commit, threads=torch.get_num_threads(),
                                    when=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"))
        failed |= bool(problems)
        for problem in problems:
            print(f"[report]   {problem}", flush=True)
        if problems and (report_dir / f"{name}.log").exists():  # CI shows no files: the log's end here
            print("".join((report_dir / f"{name}.log").read_text().splitlines(keepends=True)[-40:]), flush=True)
        _write(report_dir, meta)
    _write(report_dir, meta)
    print(f"[report] written to {report_dir / 'report.md'}")
    return 1 if failed else 0


def _write(report_dir: Path, meta: dict) -> None:
    (report_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    (report_dir / "report.md").write_text(render(report_dir))


if __name__ == "__main__":
    sys.exit(main())
