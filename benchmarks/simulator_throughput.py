"""Simulator throughput: ``esmm.data.simulate.simulate_impressions`` rows/s, default preset.

The hidden world (users, items, latents, calibrated intercepts) is built once per (preset, seed)
and cached; the first call pays for it. So the script times that first, small call separately
(world build + 10,000 rows), then 1M rows (median of repeats) and 4M rows (once by default),
each over the default 8 days. Memory of the resulting table (Arrow bytes per row) is reported.
"""

from __future__ import annotations

import time

from _common import median, parser, print_table, write_result

from esmm.data.simulate import simulate_impressions

NAME = "simulator_throughput"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", default="1000000,4000000", help="comma-separated row counts")
    p.add_argument("--repeats", type=int, default=3, help="timed calls for sizes up to 1M rows")
    p.add_argument("--preset", default="default", help="simulator preset")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.repeats = [50_000, 200_000], 1

    start = time.perf_counter()
    simulate_impressions(10_000, preset=args.preset)
    first_call = time.perf_counter() - start

    results = []
    for n in sizes:
        seconds = []
        for _ in range(args.repeats if n <= 1_000_000 else 1):
            start = time.perf_counter()
            table = simulate_impressions(n, preset=args.preset)
            seconds.append(time.perf_counter() - start)
        results.append(
            {
                "rows": n,
                "rows_per_s": n / median(seconds),
                "seconds": seconds,
                "arrow_bytes_per_row": table.nbytes / n,
            }
        )
        del table

    print_table(
        ["rows", "rows/s", "median s", "Arrow B/row"],
        [
            [r["rows"], r["rows_per_s"], median(r["seconds"]), r["arrow_bytes_per_row"]]
            for r in results
        ],
        f"simulate_impressions, preset {args.preset!r}, 8 days "
        f"(first call, world build + 10,000 rows: {first_call:.2f} s)",
    )
    write_result(
        NAME,
        args,
        {"preset": args.preset, "first_call_seconds": first_call, "sizes": results},
    )


if __name__ == "__main__":
    main()
