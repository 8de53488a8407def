"""An int8-weight matmul for x86 CPUs with AVX2: fp32 activations, int8 weights with one scale per 32 inputs.

torch has no fast kernel for this on AVX2 CPUs (its `_weight_int8pack_mm` wants bf16 activations and is slower
than fbgemm's fp16 GEMM there), so the fast int8 path (`lmtailor.fastdecode`, speedup=int8) compiles this small C
kernel with the system C compiler on first use, caches the library under the lmtailor cache folder and calls it
through ctypes (which releases the GIL, so the server's threads keep running). The weight format is llama.cpp's
Q8_0: a group of 32 weights shares one fp32 scale, so an outlier only coarsens its own group.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import torch

from lmtailor.errors import ConfigError

GROUP = 32

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 cvt8(const int8_t *p) {  /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 dot32(const float *x, const int8_t *w) {  /* one group: 8 partial sums */
    __m256 a = _mm256_mul_ps(cvt8(w), _mm256_loadu_ps(x));
    __m256 b = _mm256_mul_ps(cvt8(w + 8), _mm256_loadu_ps(x + 8));
    a = _mm256_fmadd_ps(cvt8(w + 16), _mm256_loadu_ps(x + 16), a);
    b = _mm256_fmadd_ps(cvt8(w + 24), _mm256_loadu_ps(x + 24), b);
    return _mm256_add_ps(a, b);
}

/* y (M, N) = x (M, K) @ (w (N, K) * scale (N, K/32) per group of 32)^T; K % 32 == 0; all row-major. */
void q8_matmul(const float *x, const int8_t *w, const float *scale, float *y, long M, long N, long K) {
    const long G = K / 32;
    for (long n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        const float *sr = scale + n * G;
        long m = 0;
        for (; m + 4 <= M; m += 4) {  /* several tokens: convert each weight group once for 4 of them */
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (long g = 0; g < G; g++) {
                const int8_t *wp = wr + g * 32;
                __m256 w0 = cvt8(wp), w1 = cvt8(wp + 8), w2 = cvt8(wp + 16), w3 = cvt8(wp + 24);
                __m256 s = _mm256_set1_ps(sr[g]);
#define ROW(acc, xr) { const float *p = xr + g * 32; \
                acc = _mm256_fmadd_ps(_mm256_fmadd_ps(w3, _mm256_loadu_ps(p + 24), _mm256_fmadd_ps(w2, \
                      _mm256_loadu_ps(p + 16), _mm256_fmadd_ps(w1, _mm256_loadu_ps(p + 8), \
                      _mm256_mul_ps(w0, _mm256_loadu_ps(p))))), s, acc); }
                ROW(a0, x0) ROW(a1, x1) ROW(a2, x2) ROW(a3, x3)
#undef ROW
            }
            y[m * N + n] = hsum(a0); y[(m + 1) * N + n] = hsum(a1);
            y[(m + 2) * N + n] = hsum(a2); y[(m + 3) * N + n] = hsum(a3);
        }
        for (; m < M; m++) {  /* decoding: one token; two accumulators to keep two FMA chains in flight */
            const float *xr = x + m * K;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            long g = 0;
            for (; g + 2 <= G; g += 2) {
                a0 = _mm256_fmadd_ps(dot32(xr + g * 32, wr + g * 32), _mm256_set1_ps(sr[g]), a0);
                a1 = _mm256_fmadd_ps(dot32(xr + g * 32 + 32, wr + g * 32 + 32), _mm256_set1_ps(sr[g + 1]), a1);
            }
            if (g < G) a0 = _mm256_fmadd_ps(dot32(xr + g * 32, wr + g * 32), _mm256_set1_ps(sr[g]), a0);
            y[m * N + n] = hsum(_mm256_add_ps(a0, a1));
        }
    }
}
"""
FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    from lmtailor.io import atomic_file, atomic_write_text, cache_dir

    hint = "use --speedup fp16 (the same loop with fp16 weights)"
    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() not in (
            "AVX2", "AVX512"):
        raise ConfigError(f"speedup=int8 needs an x86 CPU with AVX2; this one is {platform.machine()} "
                          f"({torch.backends.cpu.get_cpu_capability()})", hint)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise ConfigError("speedup=int8 compiles a small C kernel on first use, and no C compiler was found",
                          f"install gcc (or set $CC), or {hint}")
    key = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    folder = cache_dir("kernels")
    _check_private(folder.parent, "the lmtailor cache folder", parent=True)
    _check_private(folder, "the kernel folder")
    lib = folder / f"q8_{key}.so"
    digest = folder / f"q8_{key}.so.sha256"
    if lib.exists() or lib.is_symlink():
        _check_private(lib, "the cached int8 kernel")
    if not (lib.is_file() and digest.is_file() and _sha256(lib) == digest.read_text().strip()):
        # Missing, or not the library this process compiled (damaged, or from before hashes were kept): rebuild it.
        src = folder / f"q8_{key}.c"
        atomic_write_text(src, SOURCE)
        with atomic_file(lib) as tmp:
            done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True)
            if done.returncode != 0:
                raise ConfigError(f"compiling the int8 kernel with {compiler} failed: {done.stderr.strip()[-500:]}",
                                  hint)
        atomic_write_text(digest, _sha256(lib) + "\n")
    dll = _load_verified(lib, digest.read_text().strip())
    dll.q8_matmul.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    dll.q8_matmul.restype = None
    return dll


def _check_private(path: Path, what: str, parent: bool = False) -> None:
    """Refuse code from a place another user could have written: `path` (not followed if a link) must be owned
    by this user or root and not writable by group or others; a `parent` folder may instead be sticky (/tmp).

    Raises:
        ConfigError: naming the path, its owner or mode, and the fix.
    """
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): nothing to compare
        return
    st = os.lstat(path)
    fix = f"set $LMTAILOR_CACHE to a folder only you can write, or fix {path} (chown, chmod go-w)"
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{what} {path} is a symbolic link; refusing to load code through it", fix)
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing "
                          "to load code from it", fix)
    if st.st_mode & 0o022 and not (parent and st.st_mode & stat.S_ISVTX):
        raise ConfigError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          "refusing to load code from it", fix)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_verified(lib: Path, digest: str) -> ctypes.CDLL:
    """Open the library once, check its owner, mode and hash on that open file, and load that same file (through
    /proc/self/fd where there is one), so nothing can swap it between the check and the load."""
    fd = os.open(lib, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        st = os.fstat(fd)
        if hasattr(os, "getuid") and (st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022):
            raise ConfigError(f"the cached int8 kernel {lib} changed owner or mode while loading",
                              "set $LMTAILOR_CACHE to a folder only you can write")
        if hashlib.sha256(data).hexdigest() != digest:
            raise ConfigError(f"the cached int8 kernel {lib} does not match the hash recorded when it was built",
                              f"delete {lib.parent} and try again")
        proc = Path(f"/proc/self/fd/{fd}")
        return ctypes.CDLL(str(proc) if proc.exists() else str(lib))
    finally:
        os.close(fd)


def check() -> None:
    """Build (or find) the kernel now; raises ConfigError when it cannot be had here."""
    _library()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights (N, K), fp32 scales (N, K/32)): each group of 32 scaled so its largest |w| is 127."""
    n, k = weight.shape
    if k % GROUP:
        raise ConfigError(f"speedup=int8 needs layer widths divisible by {GROUP}; one is {k}",
                          "use --speedup fp16")
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    scale = groups.abs().amax(-1).clamp(min=1e-12) / 127  # (N, G)
    q = torch.round(groups / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


def matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) fp32 @ dequantized(q, scale)^T -> (..., N) fp32."""
    n, k = q.shape
    flat = x.reshape(-1, k).float().contiguous()  # (M, K)
    out = torch.empty(flat.shape[0], n)
    _library().q8_matmul(flat.data_ptr(), q.data_ptr(), scale.data_ptr(), out.data_ptr(), flat.shape[0], n, k)
    return out.view(*x.shape[:-1], n)
