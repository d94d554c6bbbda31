"""A stand-in for ``python -m engine`` in the fuzz test, so 1,000 calls never load torch or train.

It keeps the engine's command-line contract and does no work: ``run <job_dir>`` exits at once
without a result (the server must mark the job failed), and ``check-data -`` / ``generate -`` read
their JSON arguments from stdin, as the server sends them, and answer the one-line
``{"ok": false, "error": ...}`` the real commands print on failure. Standard library only.

    python -S -E tests/fuzz_engine_standin.py run <job_dir> | check-data - | generate -
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "run":
        return 3
    if len(argv) == 2 and argv[0] in ("check-data", "generate") and argv[1] == "-":
        raw = sys.stdin.read()
        args = json.loads(raw)
        message = f"stand-in engine: {len(raw)} characters of arguments for {sorted(args)} received on stdin"
        print(json.dumps({"ok": False, "error": {"type": "StandIn", "message": message}}))
        return 1
    print(f"unexpected arguments: {argv[:3]}", file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
