"""rblguard as the Debian package installs it: its modules compiled to bytecode, and its
one C module (the scanner's prefilter) built.

The package's postinst runs py3compile, so an installed daemon imports ``.pyc`` files.
A benchmark run from a source tree (maybe with PYTHONDONTWRITEBYTECODE set, as here)
would instead compile every module at every start: about 0.09 s of CPU for the daemon,
0.05 s for ``rblguard scan``, charged to rblguard but never paid on a mail host.  A tree
that was never built (a fresh clone, a git worktree) has no ``_prefilter`` module, and
``rblguard scan`` would measure its slower fallback.
"""

from __future__ import annotations

import compileall
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rblguard"


def compile_package() -> None:
    """Write the ``__pycache__`` files of every rblguard module (ignored by git), and
    build the prefilter in place where it is missing (setup.py; ignored by git too)."""
    compileall.compile_dir(str(PACKAGE), quiet=1)
    if not list((PACKAGE / "matching").glob("_prefilter*.so")):
        built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                               cwd=ROOT, capture_output=True, text=True)
        if built.returncode != 0:  # the figures then say so (parse.py's "prefilter")
            print(f"benchmarks: the prefilter could not be built:\n{built.stderr[-2000:]}",
                  file=sys.stderr)


def prefilter_built() -> bool:
    """Whether the rblguard that benchmarks import has its compiled prefilter."""
    from rblguard.matching import prefilter
    return prefilter.available()
