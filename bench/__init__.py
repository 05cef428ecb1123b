"""Benchmarks: the pipeline measured against the plain way and against the hardware limits.

`python -m bench.run` (`make bench`) runs every CPU benchmark and writes `bench/RESULTS.md` and
`bench/results.json`; `bash bench/gpu.sh` is the H200 part. See bench/RESULTS.md for the figures.
"""
