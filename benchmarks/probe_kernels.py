"""Triton kernels that measure what the bytes model assumes (imported lazily, like empty_kernel, so importing the
benchmarks never imports triton before TRITON_INTERPRET is decided):

* `read_kernel` with a buffer that fits in L2, read ``reps`` times by every SM: L2 read bandwidth;
* the same over a buffer far larger than L2 with a few programs, at several BLOCK sizes: one SM's sustained read
  bandwidth against the bytes it keeps in flight (the pipeline of ``tl.range(num_stages=3)`` keeps two BLOCK loads
  ahead: async copies into 2 x BLOCK x 4 bytes of shared memory in the sm_90a compile).

Each program sums its slice (so the loads cannot be dropped) and writes one number.
"""
import triton
import triton.language as tl


@triton.jit
def read_kernel(x_ptr, out_ptr, n_per_program, reps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per_program
    acc = tl.zeros((BLOCK,), tl.float32)
    for _ in range(reps):
        for start in tl.range(0, n_per_program, BLOCK, num_stages=3):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(base + offs, mask=offs < n_per_program, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))
