"""`taer bench ...`: benchmarks that compare side by side in one run and write tables, JSON and plots."""
