"""Coefficients of the polynomial behind the f32-lane log-sum-exp (src/logsumexp.rs, `lanes::POLY`).

p(r) = 1 + c1 r + ... + cn r^n approximating e^r on |r| <= h, chosen to minimise the maximum
relative error |p(r) e^-r - 1| with p(0) = 1 exactly: the Remez exchange algorithm in 60-digit
arithmetic (mpmath). With c0 fixed the error vanishes at r = 0 and the problem is the weighted
approximation of (e^r - 1) / r by a polynomial of degree n - 1, weight |r| e^-r, so the reference
points alternate in the sign of the error times the sign of r.

Run:  python tools/exp_minimax.py [degree] [divisor of ln 2 for h]   (default: 10 2, h = ln2 / 2)

Prints the equioscillation level, the maximum error with the coefficients rounded to f64 (on
20001 points), and the coefficients as Rust f64 bit patterns, c_n first.
"""

from __future__ import annotations

import struct
import sys

import mpmath as mp

mp.mp.dps = 60


def remez(n: int, h: mp.mpf, iterations: int = 30) -> tuple[list[mp.mpf], mp.mpf]:
    # n unknowns c1..cn and the level E: n + 1 reference points, Chebyshev-like to start.
    points = [h * mp.cos(mp.pi * (n - j + mp.mpf(1) / 2) / (n + 1)) for j in range(n + 1)]
    for _ in range(iterations):
        a = mp.matrix(n + 1, n + 1)
        b = mp.matrix(n + 1, 1)
        for j, x in enumerate(points):
            ex = mp.exp(-x)
            for i in range(n):
                a[j, i] = x ** (i + 1) * ex
            a[j, n] = (-1) ** j * mp.sign(x)
            b[j] = 1 - ex
        solution = mp.lu_solve(a, b)
        c = [solution[i] for i in range(n)]
        level = abs(solution[n])

        def err(x):
            return (1 + sum(c[i] * x ** (i + 1) for i in range(n))) * mp.exp(-x) - 1

        # Local extrema of |err| on a grid, refined by golden-section search.
        grid = 4000
        xs = [-h + 2 * h * k / grid for k in range(grid + 1)]
        es = [abs(err(x)) for x in xs]
        extrema = []
        for k, x in enumerate(xs):
            left = es[k - 1] if k > 0 else -1
            right = es[k + 1] if k < grid else -1
            if es[k] >= left and es[k] >= right and x != 0:
                lo, hi = max(-h, x - 2 * h / grid), min(h, x + 2 * h / grid)
                for _ in range(60):
                    m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
                    if abs(err(m1)) > abs(err(m2)):
                        hi = m2
                    else:
                        lo = m1
                xm = (lo + hi) / 2
                extrema.append(x if abs(x) == h and abs(err(x)) >= abs(err(xm)) else xm)
        # Keep the largest of each run of equal sign (of err times sign(r)).
        alternating: list[mp.mpf] = []
        for x in extrema:
            if alternating and mp.sign(err(x) * x) == mp.sign(err(alternating[-1]) * alternating[-1]):
                if abs(err(x)) > abs(err(alternating[-1])):
                    alternating[-1] = x
            else:
                alternating.append(x)
        while len(alternating) > n + 1:
            alternating.pop(0 if abs(err(alternating[0])) < abs(err(alternating[-1])) else -1)
        worst = max(abs(err(x)) for x in alternating)
        if len(alternating) == n + 1:
            points = alternating
        if abs(worst - level) < mp.mpf(10) ** -6 * level:
            break
    return c, level


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    h = mp.log(2) / (int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    c, level = remez(n, h)
    rounded = [mp.mpf(float(x)) for x in c]
    worst = max(
        abs((1 + sum(rounded[i] * x ** (i + 1) for i in range(n))) * mp.exp(-x) - 1)
        for x in (-h + 2 * h * k / 20000 for k in range(20001))
    )
    print(f"degree {n} on |r| <= {mp.nstr(h, 8)}: level {mp.nstr(level, 5)}, f64 coefficients {mp.nstr(worst, 5)}")
    for i in reversed(range(n)):
        bits = struct.unpack("<Q", struct.pack("<d", float(c[i])))[0]
        print(f"f64::from_bits(0x{bits >> 48:04X}_{bits >> 32 & 0xFFFF:04X}_{bits >> 16 & 0xFFFF:04X}_{bits & 0xFFFF:04X}), // c{i + 1}")
    print("1.0, // c0")


if __name__ == "__main__":
    main()
