"""Compiled per-point pass of :class:`ciae_core.depth.SegmentDepth` (numba, optional).

The numpy path of ``SegmentDepth`` reads the sampled id map and depth in about 25 array passes
(sampling copies, validity, groups, products with the ray grids, quantisation, group bits) before
its four sorts. :func:`point_keys` does all of it in one loop over the sampled pixels, reading the
full-resolution arrays in place: for each pixel used (non-void id asked for, interior after
erosion, depth within ``[zmin, zmax]``) it writes the four sort keys ``g << shift | q`` of
``z``, ``x = z rx``, ``y = z ry`` and ``|p| = z sqrt(1 + rx^2 + ry^2)`` (Eq. 1-4 of
:mod:`ciae_core.depth`) to consecutive slots (unused pixels are left out, so they cost no sorting)
and counts the points per segment. ``SegmentDepth`` then sorts each key row with numpy's SIMD
sort and reads the percentiles as on its numpy path.

Quantisation here is in float32 (as on the numpy path) over fixed ranges known before the pass
(``[0, zmax]`` for ``z``, ``+-zmax max|r|`` for ``x``/``y``, ``[0, zmax max|p|/z]`` for the norm):
no min/max passes; uint32 keys with ``shift`` (>= 20) value bits, so up to 4096 segments
(``SegmentDepth`` takes its numpy path beyond).

numba is an optional dependency: :func:`available` says whether it imported; ``SegmentDepth``
uses its numpy path without it. Compiled on first use per argument types and cached on disk
(``cache=True``; ``NUMBA_CACHE_DIR`` moves the cache).
"""

from __future__ import annotations

import numpy as np

try:  # optional: the numpy implementation is used without it
    import numba
except ImportError:  # pragma: no cover - depends on the installation
    numba = None


def available() -> bool:
    """Whether the compiled pass can run (numba imported)."""
    return numba is not None


def _jit(fn):
    if numba is None:
        return fn
    return numba.njit(cache=True, nogil=True, fastmath=False)(fn)


@_jit
def point_keys(ids, depth, inner, use_inner, stride, first, lut, zscale, zmin, zmax, rx, ry, shift, scale, offset,
               keys, counts, rmax):
    """One pass over the sampled pixels ``(i * stride, j * stride)``; returns how many were used.

    Args:
        ids: ``(H, W)`` int segment ids; depth: ``(H, W)`` uint16 (times ``zscale`` metres) or
            float metres (``zscale`` 1); inner: ``(H', W')`` bool interior mask of the sampled
            pixels (read only when ``use_inner``).
        first, lut: segment id -> group ``g``: ``id - first`` when ``first > 0`` (ids
            ``first .. first + n - 1``), else ``lut[id]`` (``n`` = not asked for; ids beyond it too);
            ``n = counts.size`` <= 4096.
        zmin, zmax: valid depth range (float32 comparisons, as the numpy path).
        rx, ry: ``(W',)`` x/z and ``(H',)`` y/z (float32) of the sampled columns and rows.
        shift: value bits of a key (>= 20); scale, offset: ``(4,)`` quantisation ``q = v * scale +
            offset`` of z, x, y, |p| (float32 arithmetic, ``q < 2^shift`` over the value ranges).
        keys: ``(4, H' W')`` uint32 output, rows z, x, y, |p|; the first ``used`` entries of each
            row are written. counts: ``(n,)`` int64 output, points per group (zeroed here).
        rmax: ``(n,)`` float32 output, per group the largest ``|p| / z`` of its points (zeroed here).
    """
    n = counts.size
    counts[:] = 0
    rmax[:] = 0
    h2, w2 = ry.size, rx.size
    sh = np.uint32(shift)
    sc0, sc1, sc2, sc3 = np.float32(scale[0]), np.float32(scale[1]), np.float32(scale[2]), np.float32(scale[3])
    of0, of1, of2, of3 = np.float32(offset[0]), np.float32(offset[1]), np.float32(offset[2]), np.float32(offset[3])
    z_lo, z_hi = np.float32(zmin), np.float32(zmax)
    used = 0
    for i in range(h2):
        r = i * stride
        yr = ry[i]
        yr2 = np.float32(1.0) + yr * yr
        for j in range(w2):
            c = j * stride
            lab = np.int64(ids[r, c])
            if lab <= 0:
                continue
            if use_inner and not inner[i, j]:
                continue
            if first > 0:
                g = lab - first
                if g < 0 or g >= n:
                    continue
            else:
                if lab >= lut.size:
                    continue
                g = lut[lab]
                if g >= n:
                    continue
            z = np.float32(depth[r, c]) * zscale
            if not (z >= z_lo and z <= z_hi):  # NaN fails
                continue
            xr = rx[j]
            hi = np.uint32(g) << sh
            keys[0, used] = hi | np.uint32(z * sc0 + of0)
            keys[1, used] = hi | np.uint32(z * xr * sc1 + of1)
            keys[2, used] = hi | np.uint32(z * yr * sc2 + of2)
            nf = np.sqrt(yr2 + xr * xr)
            keys[3, used] = hi | np.uint32(z * nf * sc3 + of3)
            if nf > rmax[g]:
                rmax[g] = nf
            counts[g] += 1
            used += 1
    return used


@_jit
def near_candidates(keys, shift, limit, out, counts):
    """The keys whose value part is at most their group's ``limit`` (``(n,)`` uint32), in order, into
    ``out``; ``counts`` (``(n,)`` int64, zeroed here) per group. Returns how many.

    ``SegmentDepth`` passes the norm keys and, per group, a bound above which none of the norms
    up to the near percentile's rank can lie (module docstring of :mod:`ciae_core.depth`), so
    only these few are sorted."""
    counts[:] = 0
    mask = np.uint32((1 << shift) - 1)
    sh = np.uint32(shift)
    c = 0
    for k in range(keys.size):
        key = keys[k]
        g = key >> sh
        if (key & mask) <= limit[g]:
            out[c] = key
            counts[g] += 1
            c += 1
    return c
