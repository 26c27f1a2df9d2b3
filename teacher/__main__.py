from teacher.cli import run

raise SystemExit(run())
