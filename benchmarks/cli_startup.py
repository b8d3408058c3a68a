"""How long the ``surgeon`` command takes to answer ``--help``, ``--version`` and a usage error.

Target (issue 15): under 1 s for each, which holds only while these paths import neither torch
nor Lightning nor matplotlib (``tests/test_cli_startup.py`` checks that). Runs each command
``--repeats`` times in a fresh ``python -m surgeon`` process and prints the median wall time
and its ratio to the target.

    python benchmarks/cli_startup.py
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_S = 1.0


def median_seconds(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "surgeon", *argv], capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as empty:
        commands = {
            "surgeon --help": ["--help"],
            "surgeon --version": ["--version"],
            "surgeon plot --help": ["plot", "--help"],
            "surgeon plot EMPTY_DIR (error)": ["plot", empty],
            "surgeon preview cosine --lr x (error)": ["preview", "cosine", "--lr", "x"],
        }
        print(f"{'command':<40} {'median s':>9} {'/ target':>9}")
        for name, command in commands.items():
            seconds = median_seconds(command, args.repeats)
            verdict = "met" if seconds < TARGET_S else "MISSED"
            print(f"{name:<40} {seconds:>9.3f} {seconds / TARGET_S:>9.2f}  {verdict}")
    print(f"target: < {TARGET_S:g} s each")


if __name__ == "__main__":
    main()
