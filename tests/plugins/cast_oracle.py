#!/usr/bin/python3
# cast_oracle.py: checks the `cast` stage's output against numpy, bit for bit
#
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Usage: cast_oracle.py DIR
#
# DIR/manifest.json lists cases {"name", "src", "dst", "n", "input", "output",
# "overflow"}: raw little-endian input and output files written by test-cast
# and the overflow count the stage reported. Every conversion is recomputed
# here without looking at lpipe's code: each target's representable values
# are enumerated from the format's definition, and each input is rounded to
# the nearest one by searching that table (ties to the even code). For f16 the
# table oracle is itself checked against numpy's native float16.
#
# Prints one line per mismatch and exits 1 if there is any.

import functools
import json
import os
import sys

import numpy as np

# name: (exponent bits, mantissa bits, bias, has infinities)
FORMATS = {
    "F16": (5, 10, 15, True),
    "BF16": (8, 7, 127, True),
    "F8_E5M2": (5, 2, 15, True),
    "F8_E4M3": (4, 3, 7, False),   # OCP E4M3FN: S.1111.111 is NaN, no inf
}
BITS = {"F8_E5M2": 8, "F8_E4M3": 8, "F16": 16, "BF16": 16, "F32": 32, "F64": 64}
UINT = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}


def code_value(fmt, code):
    """The value of a non-negative code, ignoring what inf/NaN codes mean."""
    e_bits, m_bits, bias, _ = FORMATS[fmt]
    e = code >> m_bits
    m = code & ((1 << m_bits) - 1)
    if e == 0:
        return m / (1 << m_bits) * 2.0 ** (1 - bias)
    return (1 + m / (1 << m_bits)) * 2.0 ** (e - bias)


def nan_code(fmt):
    e_bits, m_bits, _, has_inf = FORMATS[fmt]
    if has_inf:
        return (((1 << e_bits) - 1) << m_bits) | (1 << (m_bits - 1))
    return (1 << (e_bits + m_bits)) - 1


def is_nan_code(fmt, codes):
    e_bits, m_bits, _, has_inf = FORMATS[fmt]
    mag = codes.astype(np.int64) & ((1 << (e_bits + m_bits)) - 1)
    if has_inf:
        return mag > (((1 << e_bits) - 1) << m_bits)
    return mag == (1 << (e_bits + m_bits)) - 1


@functools.lru_cache(maxsize=None)
def table(fmt):
    """Codes of all non-negative finite values in increasing order, plus the
    code just past the largest finite one (inf, or NaN for E4M3) with the
    value it would have: rounding to it means overflow."""
    e_bits, m_bits, bias, has_inf = FORMATS[fmt]
    if has_inf:
        n_finite = ((1 << e_bits) - 1) << m_bits
    else:
        n_finite = (1 << (e_bits + m_bits)) - 1
    codes = np.arange(n_finite + 1, dtype=np.int64)
    values = np.array([code_value(fmt, int(c)) for c in codes])
    assert np.all(np.diff(values) > 0)
    return codes, values


def round_to(fmt, x):
    """Rounds float64 x to fmt: returns (codes, overflow mask)."""
    e_bits, m_bits, _, has_inf = FORMATS[fmt]
    codes, values = table(fmt)
    sign_bit = 1 << (e_bits + m_bits)
    past = codes[-1]            # the code past the largest finite value
    over_code = past if has_inf else nan_code(fmt)

    nan = np.isnan(x)
    a = np.abs(np.where(nan, 0.0, x))
    sign = np.signbit(x) & ~nan
    with np.errstate(invalid="ignore"):
        hi = np.searchsorted(values, a, side="left")     # values[hi] >= a
    hi_c = np.minimum(hi, len(values) - 1)
    lo_c = np.maximum(hi - 1, 0)
    exact = values[hi_c] == a
    d_lo = a - values[lo_c]
    d_hi = values[hi_c] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi_c] % 2 == 0))
    out = np.where(exact, codes[hi_c], np.where(pick_hi, codes[hi_c], codes[lo_c]))
    beyond = hi >= len(values)          # larger than even the pseudo-value
    finite = np.isfinite(x)
    overflow = finite & (beyond | (out == past))
    out = np.where(beyond | (out == past), over_code, out)
    out = np.where(np.isinf(x), past if has_inf else nan_code(fmt), out)
    out = np.where(nan, nan_code(fmt), out)
    out = out | np.where(sign | (np.isnan(x) & np.signbit(x)), sign_bit, 0)
    return out.astype(np.int64), overflow


def decode(dtype, raw, n):
    """Exact float64 values of n elements of dtype."""
    if dtype == "F64":
        return np.frombuffer(raw, dtype="<f8", count=n).astype(np.float64)
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4", count=n).astype(np.float64)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2", count=n).astype(np.float64)
    if dtype == "BF16":
        u = np.frombuffer(raw, dtype="<u2", count=n).astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    codes = np.frombuffer(raw, dtype=np.uint8, count=n).astype(np.int64)
    e_bits, m_bits, _, has_inf = FORMATS[dtype]
    sign_bit = 1 << (e_bits + m_bits)
    mag = codes & (sign_bit - 1)
    vals = np.array([code_value(dtype, int(c)) for c in range(sign_bit)])[mag]
    if has_inf:
        vals = np.where(mag == (((1 << e_bits) - 1) << m_bits), np.inf, vals)
    vals = np.where(is_nan_code(dtype, codes), np.nan, vals)
    return np.where(codes & sign_bit, -vals, vals)


def self_check():
    """The table oracle agrees with numpy's own float16 rounding."""
    rng = np.random.default_rng(7)
    x = np.concatenate([
        rng.integers(0, 2**32, 200000, dtype=np.uint64).astype(np.uint32).view(np.float32).astype(np.float64),
        rng.standard_normal(100000) * 2.0 ** rng.integers(-30, 20, 100000),
        np.array([65504.0, 65519.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25, -0.0, np.inf, -np.inf]),
    ])
    ours, _ = round_to("F16", x)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16).astype(np.int64)
    nan = np.isnan(x)
    bad = (ours != ref) & ~nan
    assert not bad.any(), "table oracle disagrees with numpy float16 at %r" % x[bad][:5]


def main():
    # NaN inputs and overflow are the point here, not accidents
    np.seterr(all="ignore")
    directory = sys.argv[1]
    with open(os.path.join(directory, "manifest.json")) as f:
        cases = json.load(f)

    self_check()
    failures = 0
    checked = 0
    for case in cases:
        src, dst, n = case["src"], case["dst"], case["n"]
        with open(os.path.join(directory, case["input"]), "rb") as f:
            x = decode(src, f.read(), n)
        with open(os.path.join(directory, case["output"]), "rb") as f:
            raw = f.read()
        if len(raw) != n * BITS[dst] // 8:
            print("%s: %s -> %s: %d bytes, want %d" % (case["name"], src, dst, len(raw), n * BITS[dst] // 8))
            failures += 1
            continue
        got = np.frombuffer(raw, dtype=UINT[BITS[dst]]).astype(np.int64)

        if dst in FORMATS:
            want, overflow = round_to(dst, x)
            if dst == "F16":
                # numpy's own conversion, straight from f64 or f32 alike
                with np.errstate(over="ignore", invalid="ignore"):
                    ref = x.astype(np.float16).view(np.uint16).astype(np.int64)
                assert np.array_equal(ref[~np.isnan(x)], want[~np.isnan(x)])
            got_nan = is_nan_code(dst, got)
            want_nan = is_nan_code(dst, want)
            sign_bit = 1 << (BITS[dst] - 1)
            bad = np.where(want_nan, ~got_nan | ((got & sign_bit) != (want & sign_bit)), got != want)
        elif dst == "F32":
            with np.errstate(over="ignore"):
                ref = x.astype(np.float32)
            want = ref.view(np.uint32).astype(np.int64)
            overflow = np.isfinite(x) & np.isinf(ref)
            bad = np.where(np.isnan(x), ~np.isnan(got.astype(np.uint32).view(np.float32)), got != want)
        elif dst == "F64":
            want = x.view(np.uint64).astype(np.int64)
            overflow = np.zeros(n, dtype=bool)
            bad = np.where(np.isnan(x), ~np.isnan(got.astype(np.uint64).view(np.float64)), got != want)
        else:
            raise SystemExit("unknown target " + dst)

        checked += n
        if bad.any():
            failures += 1
            idx = np.nonzero(bad)[0]
            print("%s: %s -> %s: %d of %d differ" % (case["name"], src, dst, len(idx), n))
            for i in idx[:8]:
                print("  [%d] %r: got 0x%x, want 0x%x" % (i, float(x[i]), int(got[i]), int(want[i])))
        if int(overflow.sum()) != case["overflow"]:
            failures += 1
            print("%s: %s -> %s: stage reported %d overflows, want %d"
                  % (case["name"], src, dst, case["overflow"], int(overflow.sum())))

    print("checked %d values in %d cases, %d failures" % (checked, len(cases), failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
