"""loraprune's benchmark suite: kernel micro-benchmarks (pytest-benchmark) and end-to-end studies.

See benchmarks/README.md for the commands, the CSV schema and how floors are computed.
"""
