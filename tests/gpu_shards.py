"""Run the GPU-marked tests in parallel pytest processes (for the device machine).

The GPU tests spend most of their time compiling Triton kernels on the CPU (one float32 D = 256
delta-rule test compiled for 491 s on an H100 host), one kernel after another in a single pytest
process. Splitting the selected tests over several processes runs those compiles side by side on
the host's cores (16 on the device machines); they share the GPU, which these tests barely load.

    python tests/gpu_shards.py                                    # every gpu test, 4 processes
    python tests/gpu_shards.py -n 6 --timeout 500 tests/test_kernels_linear.py -k "fp32"
    python tests/gpu_shards.py --logs "$OUT"                      # one log per process there

Arguments after the options are passed to pytest's collection (files, ``-k`` ...; a ``-m`` expression
is combined with this script's ``gpu`` and ``bigmem`` ones, not put in their place). The selected
tests are dealt round-robin over the processes in collection order, so each gets a share of every
file. Prints each process's pytest summary line and the failures; exits non-zero when a process
failed, errored or ran past ``--timeout`` seconds (its log keeps what it printed). No GPU here: the
tests are collected and reported as skipped, which is how the CPU suite checks this script.

Tests also marked ``bigmem`` (each needs most of the GPU's memory: two processes beside one ran out of
it on an H100) run after the others, alone, in one more process (log ``gpu_bigmem.txt``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected)\b")


def collect(pytest_args: list[str], marks: str = "gpu") -> list[str]:
    """Node ids of the tests that ``pytest_args`` and the marker expression select (collection only)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marks,
           *pytest_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    ids = [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if proc.returncode not in (0, 5) or (proc.returncode == 0 and not ids):  # 5: nothing collected
        raise SystemExit(f"gpu_shards: collection failed (pytest exit {proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return ids


def split_marks(pytest_args: list[str]) -> tuple[str | None, list[str]]:
    """A marker expression the caller passed (``-m EXPR`` or ``-mEXPR``; the last one, as pytest takes
    it) and the other arguments. Passed on as they are, it would replace this script's own expression
    (pytest keeps the last ``-m``): the bigmem tests would then be dealt into the parallel shards and
    run a second time after them, so the script combines the two instead."""
    marks, rest, i = None, [], 0
    while i < len(pytest_args):
        arg = pytest_args[i]
        if arg == "-m":
            if i + 1 == len(pytest_args):
                raise ValueError("gpu_shards: -m needs a marker expression")
            marks, i = pytest_args[i + 1], i + 2
            continue
        if arg.startswith("-m") and not arg.startswith("--"):
            marks = arg[2:]
        else:
            rest.append(arg)
        i += 1
    return marks, rest


def deal(ids: list[str], n: int) -> list[list[str]]:
    """``ids`` dealt round-robin into at most ``n`` non-empty shards, each in collection order."""
    if n < 1:
        raise ValueError(f"gpu_shards: -n must be at least 1, got {n}")
    shards = [ids[i::n] for i in range(min(n, len(ids)))]
    return [s for s in shards if s]


def summary_line(log: str) -> str:
    """The last line of a pytest log that reports counts ("3 passed, 1 failed in 12.3s")."""
    lines = [line.strip("= ").strip() for line in log.splitlines() if _SUMMARY.search(line)]
    return lines[-1] if lines else "(no pytest summary: see the log)"


def run(shards: list[list[str]], timeout: float, logs: Path, name: str = "gpu_shard") -> int:
    """Run one pytest process per shard at once; print each one's summary; 0 when all passed."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    t0 = time.monotonic()
    for i, ids in enumerate(shards):
        log = logs / (f"{name}{i}.txt" if len(shards) > 1 or name == "gpu_shard" else f"{name}.txt")
        fh = open(log, "w")  # noqa: SIM115 - closed below, after the process ends
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *ids]
        procs.append((i, log, fh, subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)))
    bad = 0
    for i, log, fh, proc in procs:
        left = max(1.0, timeout - (time.monotonic() - t0))
        try:
            rc = proc.wait(timeout=left)
            status = f"exit {rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            status = f"killed after {timeout:.0f} s"
            bad += 1
        fh.close()
        text = log.read_text(errors="replace")
        if rc not in (0, 5) and not status.startswith("killed"):
            bad += 1
        print(f"{name} {i} ({len(shards[i])} tests, {status}): {summary_line(text)}  [{log}]")
        for line in text.splitlines():
            if line.startswith(("FAILED", "ERROR")):
                print(f"  {line}")
    print(f"{len(shards)} processes, {time.monotonic() - t0:.0f} s")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--processes", type=int, default=4, help="pytest processes at once (default 4)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for all of them (default 3600)")
    ap.add_argument("--logs", default=os.environ.get("OUT", "."),
                    help="folder for the logs (default $OUT or .)")
    args, pytest_args = ap.parse_known_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout must be positive, got {args.timeout}")
    try:
        marks, pytest_args = split_marks(pytest_args)
        both = f"({marks}) and " if marks else ""
        shards = deal(collect(pytest_args or ["tests"], f"{both}gpu and not bigmem"), args.processes)
    except ValueError as e:
        ap.error(str(e))
    big = collect(pytest_args or ["tests"], f"{both}gpu and bigmem")
    if not shards and not big:
        print("gpu_shards: no gpu test selected")
        return 0
    t0, rc = time.monotonic(), 0
    if shards:
        rc = run(shards, args.timeout, Path(args.logs))
    if big:
        left = args.timeout - (time.monotonic() - t0)
        if left <= 0:
            print(f"gpu_bigmem: {len(big)} tests not run: the timeout was spent")
            return 1
        rc = max(rc, run([big], left, Path(args.logs), name="gpu_bigmem"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
