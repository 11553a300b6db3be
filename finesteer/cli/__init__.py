"""The ``finesteer`` command line (the console script ``finesteer = finesteer.cli:main``): argparse, option groups,
checks before expensive work, one-line errors. The only wing that may import every other one."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
