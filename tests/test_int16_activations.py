"""The opt-in int16-activation kernels ($TORCHLESS_INT16_ACTIVATIONS=1, kernels/int16_tiles)
against gguf-py's weights in float64, and SmolLM2 through them against transformers.

The switch is read once, when the kernels are imported, so each check runs in a subprocess with
it set: this file runs itself (`python test_int16_activations.py CHECK`)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(*args: str, value: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCHLESS_INT16_ACTIVATIONS": value}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=HERE)


def _check(name: str) -> str:
    done = _run(os.path.join(HERE, "test_int16_activations.py"), name)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _host_has_vnni() -> bool:
    from torchless.kernels.int16_tiles import HOST_VNNI

    return HOST_VNNI


def test_products_of_2_to_32_rows_hold_the_float64_bound_on_each_int16_layout():
    out = _check("products")
    assert ("int16 kernels on" in out) == _host_has_vnni(), out


def test_a_non_finite_activation_makes_its_row_non_finite_and_no_other():
    _check("non_finite")


def test_the_switch_is_reported_when_it_cannot_be_used_or_is_not_understood():
    done = _run("-c", "import torchless.kernels.int16_tiles as t; print(t.ENABLED)", value="maybe")
    assert done.stdout.strip() == "False"
    assert "TORCHLESS_INT16_ACTIVATIONS=maybe is not 1 or 0" in done.stderr
    if not _host_has_vnni():
        done = _run("-c", "import torchless.kernels.int16_tiles as t; print(t.ENABLED)")
        assert done.stdout.strip() == "False" and "needs AVX-512 VNNI" in done.stderr


def test_smollm2_prompt_logits_and_greedy_continuation_match_transformers(smollm2_path):
    """The existing parity gate (max |logit diff| < 2e-3, 32 greedy tokens identical) with the
    switch on: the prompts (5 to 20 tokens) are prefilled through the int16 kernels."""
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "-n0", "-s",
                "test_smollm2_vs_transformers.py::test_last_logits_and_greedy_continuation")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout


# --- the checks, run in the subprocess ------------------------------------------------------

def _weights():
    from gguf import GGMLQuantizationType as GT
    from test_qmatmul import make_weight
    from test_quant import oracle, random_qtensor

    from torchless.kernels import qmatmul as qm

    rows, cols = 70, 512
    out = {}
    for t in (GT.Q4_0, GT.Q4_1, GT.Q8_0, GT.Q4_K):  # nibbles, and bytes in groups of 32
        q, ref = make_weight(t, rows, cols, seed=int(t))
        out[t.name] = (qm.prepare(q), ref)
    q = random_qtensor(GT.IQ2_XS, rows=rows, blocks_per_row=cols // 256, seed=5)  # bytes, groups of 16
    out["IQ2_XS"] = (qm.prepare(q), oracle(GT.IQ2_XS, q.data).reshape(rows, cols).astype(np.float64))
    return out


def check_products():
    from test_qmatmul import check

    from torchless.kernels import adaptive, int16_tiles
    from torchless.kernels import qmatmul as qm

    if int16_tiles.ENABLED:
        print("int16 kernels on")
    for name, (w, ref) in _weights().items():
        assert int16_tiles.ENABLED == (int16_tiles.HOST_VNNI and w.kind in ("q4", "q8")), name
        top = int16_tiles.MAX_ROWS_NIBBLES if w.codes.dtype == np.uint8 else int16_tiles.MAX_ROWS_BYTES
        X = np.random.default_rng(1).standard_normal((top + 1, w.cols)).astype(np.float32)
        X[:, 5] *= 40  # an outlier column, as real activations have: kept apart in float32
        X[3, 100:132] *= 1e-3  # a quiet group beside loud ones
        whole = np.empty((top, w.rows), np.float32)
        qm.matmul_into(w, X[:top], whole)
        for m in sorted({*range(1, 18), top - 1, top, top + 1}):
            for fn in (qm.matmul_into, adaptive.matmul_adaptive_into):
                out = np.full((m, w.rows), np.nan, np.float32)
                fn(w, X[:m], out)
                for i in range(m):
                    check(out[i], ref, X[i])
            if 2 <= m <= top:  # a row's result does not depend on the rows beside it
                part = np.empty((m, w.rows), np.float32)
                qm.matmul_into(w, X[top - m:top], part)
                np.testing.assert_array_equal(part, whole[top - m:], err_msg=f"{name}: {m} of {top} rows")


def check_non_finite():
    from torchless.kernels import qmatmul as qm

    for name, (w, _) in _weights().items():
        X = np.random.default_rng(2).standard_normal((6, w.cols)).astype(np.float32)
        clean = np.empty((6, w.rows), np.float32)
        qm.matmul_into(w, X, clean)
        X[1, 3], X[2, 40], X[4, 500] = np.nan, np.inf, -np.inf
        out = np.empty((6, w.rows), np.float32)
        qm.matmul_into(w, X, out)
        assert not np.isfinite(out[[1, 2, 4]]).any(), name
        np.testing.assert_array_equal(out[[0, 3, 5]], clean[[0, 3, 5]], err_msg=name)


if __name__ == "__main__":
    {"products": check_products, "non_finite": check_non_finite}[sys.argv[1]]()
