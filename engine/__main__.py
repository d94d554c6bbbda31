"""``python -m engine``: the worker entry point and the one-shot commands the server runs.

    python -m engine run <job_dir>            run a job (the server and ``backprop`` start this)
    python -m engine rank <job_dir>           one rank of a job on several devices (torchrun starts it)
    python -m engine warm <dir> [delay_s]     a worker kept warm by the server: imports, then runs the
                                              one job it is handed on stdin (engine.jobs.warm_worker)
    python -m engine check-data '<json>'      dataset report + token statistics + defaults, as JSON
    python -m engine generate '<json>'        generate from a base model / adapter, as JSON
    (in place of '<json>', '-' reads the JSON from stdin: the server passes it so, never in argv)

The one-shot commands print exactly one JSON object on stdout (``{"ok": false, "error": ...}`` on
failure) so that the torch-free server can call them as subprocesses.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "run":  # each entry loads only its own stack
        from engine.jobs.worker import run_job

        return run_job(args[1])
    if len(args) == 2 and args[0] == "rank":
        from engine.jobs.rank_launcher import run_rank

        return run_rank(args[1])
    if len(args) in (2, 3) and args[0] == "warm":
        from engine.jobs.warm_worker import serve

        return serve(args[1], float(args[2]) if len(args) == 3 else 0.0)
    if len(args) == 2 and args[0] in ("check-data", "generate"):
        from engine.jobs.commands import run_oneshot

        return run_oneshot(args[0], args[1])
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main())
