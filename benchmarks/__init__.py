"""fastdet's benchmark suite (pytest-benchmark). A package so the benchmark modules can share ``benchmarks.common``."""
