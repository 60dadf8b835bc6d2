"""Compiled kernels are cached in a folder keyed by every kernel source, not file by file.

numba keys a cached function on its own file alone: after an upgrade that changed qmatmul.py's Q5
tile but not gemm.py, gemm's cached expansion still inlined the old tile and gave wrong weights
(CI on a reused site-packages, and every `pip install -U` user)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numba

from torchless import kernels
from torchless.kernels import gemm, qmatmul


def test_a_change_to_any_kernel_file_changes_the_cache_folder(tmp_path):
    copy = tmp_path / "kernels"
    shutil.copytree(Path(kernels.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = kernels.source_hash(copy)
    assert before == kernels.source_hash(Path(kernels.__file__).parent)
    (copy / "README.txt").write_text("not a source file")
    assert kernels.source_hash(copy) == before
    qm = copy / "qmatmul.py"
    qm.write_text(qm.read_text() + "\n# one more line\n")
    assert kernels.source_hash(copy) != before


def test_kernels_from_every_file_cache_under_the_hashed_folder():
    folder = f"kernels-{kernels.source_hash()}"
    assert Path(numba.config.CACHE_DIR).name == folder
    for kernel in (gemm._dqt_q4, qmatmul._dq_tile_q4):
        assert folder in Path(kernel._cache._cache_path).parts


def test_numba_cache_dir_still_chooses_where(tmp_path):
    code = "import numba, torchless.kernels as k; print(numba.config.CACHE_DIR)"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / f"kernels-{kernels.source_hash()}")


def test_other_versions_kernels_go_once_unused_for_a_month(tmp_path):
    stale, recent = tmp_path / "kernels-0000000000000000", tmp_path / "kernels-1111111111111111"
    for folder in (stale, recent):
        folder.mkdir()
        (folder / "f.nbi").write_bytes(b"x")
    month_ago = time.time() - (kernels.STALE_AFTER_DAYS + 1) * 86400
    os.utime(stale, (month_ago, month_ago))
    code = "import numba, torchless.kernels as k; print(numba.config.CACHE_DIR)"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert not stale.exists() and recent.exists()
    assert (tmp_path / f"kernels-{kernels.source_hash()}").is_dir()


def test_intel_avx512_hosts_are_scheduled_as_haswell_others_as_themselves():
    assert kernels.tuning_cpu("auto", "emeraldrapids") == "haswell"
    assert kernels.tuning_cpu("auto", "skylake-avx512") == "haswell"
    assert kernels.tuning_cpu("auto", "znver4") is None
    assert kernels.tuning_cpu("host", "emeraldrapids") is None
    assert kernels.tuning_cpu("skylake", "znver4") == "skylake"


def _import_kernels(**env) -> subprocess.CompletedProcess:
    """A fresh interpreter that imports the kernels with only `env`'s CPU settings and prints
    the CPU name numba will compile for."""
    code = "import numba, torchless.kernels; print(numba.config.CPU_NAME)"
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU")}
    base.pop("TORCHLESS_CPU_TUNING", None)
    return subprocess.run([sys.executable, "-c", code], env=dict(base, **env), capture_output=True,
                          text=True, check=True)


def _cpu_name_after_import(**env) -> str:
    return _import_kernels(**env).stdout.strip()


def test_the_tuning_reaches_numba_and_an_explicit_numba_cpu_name_wins():
    import llvmlite.binding
    host = llvmlite.binding.get_host_cpu_name()
    assert _cpu_name_after_import() == str(kernels.tuning_cpu("auto", host))
    assert _cpu_name_after_import(TORCHLESS_CPU_TUNING="host") == "None"
    assert _cpu_name_after_import(TORCHLESS_CPU_TUNING="haswell") == "haswell"
    explicit = _cpu_name_after_import(TORCHLESS_CPU_TUNING="haswell", NUMBA_CPU_NAME="skylake")
    assert explicit == "skylake"


def test_a_cpu_name_llvm_does_not_know_is_said_once_and_auto_used():
    import llvmlite.binding
    out = _import_kernels(TORCHLESS_CPU_TUNING="haswel")
    host = llvmlite.binding.get_host_cpu_name()
    assert out.stdout.strip() == str(kernels.tuning_cpu("auto", host))
    said = ("torchless: TORCHLESS_CPU_TUNING=haswel is not a CPU name LLVM knows; using auto")
    assert said in out.stderr.splitlines() and "not a recognized processor" not in out.stderr
    assert kernels.llvm_knows_cpu("haswell") and not kernels.llvm_knows_cpu("haswel")


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_openmp_workers_spin_briefly_unless_told_otherwise():
    """libgomp's workers spin 300,000 loops after each parallel region by default, holding the cores
    our other threads wait for; torchless asks for a short spin before numba loads libgomp."""
    import torchless

    code = "import os, torchless; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _python(code) == str(torchless.SPIN_COUNT)
    assert _python(code, GOMP_SPINCOUNT="5") == "5"
    assert _python(code, OMP_WAIT_POLICY="passive") == "None"


def test_each_kernel_module_imports_on_its_own():
    for module in ("qmatmul_batch", "qmatmul", "adaptive", "phases", "fused_layer", "gemm"):
        assert _python(f"import torchless.kernels.{module}; print('ok')") == "ok"
