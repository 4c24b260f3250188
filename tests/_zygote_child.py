"""An entry point for processes forked by the zygote in tests/test_zygote.py."""

import os
import sys
import time


def main() -> int:
    """Print what the process sees; sleep ZYGOTE_SLEEP s; exit with ZYGOTE_EXIT."""
    print(f"env={os.environ.get('ZYGOTE_MARK')} path_has_tests={any(p.endswith('tests') for p in sys.path)}"
          f" cwd={os.getcwd()}", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("ZYGOTE_SLEEP", "0")))
    return int(os.environ.get("ZYGOTE_EXIT", "0"))


def fail() -> int:
    raise ValueError("a bug in the role")
