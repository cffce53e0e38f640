"""The fedbayes command line, presets, comparisons and benchmarks."""
