"""Wall time of every command in the README's CLI section on the embedded model (issue #21).

Reads the commands from README.md's CLI code block (so the README and this list never drift) and
runs them in order, each as ``python -m …`` in a subprocess, in one fresh working folder: ``out/``
starts empty, the first command that needs statistics computes them and the later ones read the
cache, exactly as a first-time user running the README top to bottom. Records per command the wall
seconds, exit status and last stdout line, and for the run the CPU, torch threads, load average
before and after each command, versions, git commit and date.

    python -m benchmarks.bench_cli --out benchmarks/results/cli_durations_cpu.json
    python -m benchmarks.bench_cli --only 0,1            # the first two commands (a check of the script)
    python -m benchmarks.bench_cli --only 0,1,2,3 --update --out benchmarks/results/cli_durations_cpu.json

``--update`` remeasures some commands after a change to them (in a fresh folder too, so run the
commands before them that fill their caches) and keeps the file's other rows; each row has its date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The ``python -m …`` lines of the first code block under the README's "## CLI" heading,
    without their comments."""
    text = readme.read_text()
    section = text.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    out = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv[:2] == ["python", "-m"]:
            out.append(shlex.join(argv))
    return out


def fmt_duration(seconds: float) -> str:
    """How the README quotes a duration: whole seconds below 90 s, else minutes to one decimal."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def markdown_rows(result: dict) -> list[str]:
    """The README's duration table rows of a result: ``| `command` | duration |``."""
    return [f"| `{r['command']}` | {fmt_duration(r['seconds'])} |" for r in result["commands"]]


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    from dirotq._version import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "dirotq": __version__}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON result file (default: print only)")
    ap.add_argument("--workdir", default=None, help="working folder (default: a fresh temporary one)")
    ap.add_argument("--only", default=None, help="comma-separated indices of the README commands to run")
    ap.add_argument("--update", action="store_true", help="replace only these commands' rows of the --out file")
    a = ap.parse_args(argv)
    commands = readme_commands()
    if a.only:
        commands = [commands[int(i)] for i in a.only.split(",")]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dirotq-bench-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    # the commands import this checkout's dirotq and analysis whatever the working folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    rows = []
    started = datetime.datetime.now(datetime.timezone.utc)
    for cmd in commands:
        argv_ = shlex.split(cmd)
        load_before = _load()
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, *argv_[1:]], cwd=work, env=env, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        last = (p.stdout.strip().splitlines() or [""])[-1][:200]
        rows.append({"command": cmd, "seconds": round(dt, 1), "exit_status": p.returncode, "last_stdout_line": last,
                     "load_average_before": load_before, "load_average_after": _load(),
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "commit": _git("rev-parse", "--short", "HEAD")})
        print(f"{dt:8.1f} s  rc={p.returncode}  {cmd}", flush=True)
        if p.returncode:
            print(p.stderr[-2000:], file=sys.stderr)
        if a.out and not a.update:  # after every command: an interrupted run keeps what it measured
            _write(a.out, _result(rows, started, complete=len(rows) == len(commands)))
    if a.update and a.out and Path(a.out).is_file():
        prev = json.loads(Path(a.out).read_text())
        new = {r["command"]: r for r in rows}
        old = {r["command"]: {"date": prev.get("started"), "commit": prev.get("commit"), **r}
               for r in prev["commands"]}
        rows = [new.get(c) or old[c] for c in readme_commands() if c in new or c in old]
    result = _result(rows, started, complete=True)
    print("\n".join(["| command | wall time |", "|---|---|", *markdown_rows(result)]))
    if a.out:
        _write(a.out, result)
        print(f"wrote {a.out}")
    return 0 if all(r["exit_status"] == 0 for r in rows) else 1


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def _result(rows: list[dict], started: datetime.datetime, complete: bool) -> dict:
    import torch

    from dirotq.eval.protocol import device_description

    return {
        "benchmark": "readme_cli_commands", "complete": complete, "model": "assets/tiny-pixart (embedded)",
        "how": "README.md's CLI block in order, one fresh working folder, each command a subprocess "
               "(cold caches: the first command needing statistics computes them, later ones reuse them)",
        "cpu": device_description(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "versions": _versions(), "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "total_seconds": round(sum(r["seconds"] for r in rows), 1), "commands": rows,
    }


if __name__ == "__main__":
    raise SystemExit(main())
