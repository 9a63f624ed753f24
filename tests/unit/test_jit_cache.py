import os
import subprocess
import sys
import textwrap
from pathlib import Path

import detector
from detector.jit_cache import COMPILED

RUN = """
import sys
sys.path.insert(0, {root!r})
if {refresh}:
    from pathlib import Path
    from detector.jit_cache import drop_if_stale
    package = Path({root!r}) / "pkg"
    print(drop_if_stale(package / "__pycache__", [package / "a.py", package / "b.py"]))
from pkg.b import g
print(g())
"""


def test_the_list_of_compiled_modules_names_every_module_with_kernels():
    package = Path(detector.__file__).parent
    with_kernels = {
        path.stem
        for path in package.glob("*.py")
        if path.stem != "jit_cache"
        and ("cache=True" in (text := path.read_text()) or "@intrinsic" in text)
    }
    assert set(COMPILED) == with_kernels


def test_a_kernel_that_calls_another_module_is_compiled_again_when_that_module_changes(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    a = tmp_path / "pkg" / "a.py"
    kernel = "import numba\n\n@numba.njit(cache=True)\ndef f():\n    return {}\n"
    a.write_text(kernel.format(1))
    (tmp_path / "pkg" / "b.py").write_text(
        textwrap.dedent("""
            import numba
            from pkg.a import f

            @numba.njit(cache=True)
            def g():
                return f() * 10
        """)
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}

    def run(refresh: bool) -> list[str]:
        code = RUN.format(root=str(tmp_path), refresh=refresh)
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run(refresh=False) == ["10"]
    a.write_text(kernel.format(2))
    stat = a.stat()
    os.utime(a, (stat.st_atime + 10, stat.st_mtime + 10))  # a new stamp even within a second
    # numba's own cache: g still runs the old f (if this fails, numba tracks what a kernel calls,
    # and jit_cache can go)
    assert run(refresh=False) == ["10"]
    assert run(refresh=True) == ["True", "20"]  # stale: dropped, and compiled again
    assert run(refresh=True) == ["False", "20"]  # current: kept
