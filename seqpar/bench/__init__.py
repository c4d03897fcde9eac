"""``seqpar bench``: side-by-side benchmarks -> results.json, PNG plots, targets and a Markdown section.

suites (what runs) -> runner / scaling (fresh processes per configuration) -> methods / training (one step of
each method) -> measure (time, memory) -> report (ratios, targets, tables, plots) -> markdown (docs page).
"""
