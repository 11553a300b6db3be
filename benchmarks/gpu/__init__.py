"""The sections of the one-shot GPU check (`benchmarks/gpu_check.py`, the driver), one module per measurement.

Each section module has ``NAME`` (its key in the JSON), ``DEADLINE`` (the share of the run's time budget after
which it starts nothing new), ``run(section, context)`` (`record.Section`, `record.Context`; returns a dict that
joins its record), ``markdown(results)`` (its tables) and optionally ``goals(results)``. Its sizes sit beside it:
the GPU's and the dry run's (tiny, interpreted, one repetition of each timing). `record` holds the live JSON
record, `child` runs a section in a process of its own with a timeout, `steer_case` the case several sections
share, and `markdown` assembles the report.
"""
