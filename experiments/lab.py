"""What the lab's protocols share: they run the stage scripts' own command lines from the
repository root, skip a command whose output exists (an interrupted protocol continues), and
write reports whose paths are relative to the repository (a report made here reads the same on
another machine)."""

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown(arg):
    """A command-line word as a report shows it: a path inside the repository relative to it."""
    path = Path(str(arg))
    if path.is_absolute() and path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return str(arg)


def run_stage(script, *args, log, done=None, name="experiments", stop_on_failure=True):
    """`python SCRIPT ARGS` from the repository root, unless its output `done` exists; the command
    (paths relative to the repository) and its seconds go to `log`. -> the exit code. A failure
    ends the protocol with one line, unless stop_on_failure is False."""
    command = "python " + " ".join([script, *map(shown, args)])
    if done is not None and Path(done).exists():
        print(f"\n(already done: {command})", flush=True)
        log.append(dict(command=command, seconds=None, exit_code=0))
        return 0
    print(f"\n$ {command}", flush=True)
    t = time.time()
    code = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT
    ).returncode
    log.append(dict(command=command, seconds=round(time.time() - t, 1), exit_code=code))
    if code and stop_on_failure:
        sys.exit(
            f"{name}: error: `{command}` failed with exit code {code} (its own message is above); "
            "fix it and run again: finished commands are skipped"
        )
    return code


def command_lines(log):
    """The report's list of commands, each with its seconds (none: it was done before)."""
    return [
        f"    {e['command']}"
        + (f"    # {e['seconds']:.0f} s" if e["seconds"] else "")
        + (f", exit {e['exit_code']}" if e.get("exit_code") else "")
        for e in log
    ]
