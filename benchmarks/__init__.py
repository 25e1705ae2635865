"""composemirror's benchmarks: `python -m benchmarks` measures the tunnel against its baselines.

Each figure is measured beside its baseline in the same run, on the same engine, and reported as
absolute numbers and a ratio, with the issue's target and PASS/MISS. `report` is pure, `lab` is the
only module that runs Docker, `suite` holds the six benchmarks, `loadgen.c` the load generator.
"""
