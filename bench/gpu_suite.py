"""Kept for old commands: `python bench/gpu_suite.py ARGS` is `python bench/suite.py --gpu ARGS`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--gpu", *sys.argv[1:]]))
