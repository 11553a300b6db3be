"""FineSteer benchmarks: the steering op (eager reference, byte-frugal eager, torch.compile, Triton kernels) and
end-to-end generation overhead. Entry points: ``python -m benchmarks.run`` (table + JSON + plot),
``python benchmarks/gpu_check.py`` (the one-shot GPU script), ``pytest benchmarks/ --benchmark-only``.
See benchmarks/README.md."""
