"""What programmatic dependent launch (`pdl`) is predicted to save. Plain Python, like `perf_model`.

Back-to-back dependent launches in a CUDA graph: the previous kernel's last program exits, its writes are flushed,
then our grid is scheduled and our programs run their prologue before their first loads (the first of the round
trips in `Prediction.latency_us`). That stretch, the launch gap, is what an empty kernel costs per launch in a graph
(`gpu_check`'s ``empty_kernel`` section measures it). With PDL, and a previous kernel that lets dependents start
early (``griddepcontrol.launch_dependents``: ours do, right after their own wait), our programs are already resident
and blocked in ``griddepcontrol.wait``; what remains is the wait's release once the previous grid has completed and
its writes are visible. The first round trip is *not* hidden: the wait precedes every memory access (`pdl` says
why), so the loads still start after the release. After a kernel that never triggers (PyTorch's and cuBLAS's
kernels) the model assumes no gain: dependents are then scheduled only as its programs exit.

Both figures are assumptions until the GPU run: the gap is the ~2 us an empty kernel is assumed to take in a graph
(docs/kernels.md); the release is taken as 0.5 us (a completion signal and a memory flush, no grid scheduling).
"""
from __future__ import annotations

from .perf_model import Prediction

GRAPH_GAP_US = 2.0  # assumed: an empty kernel's time per launch in a CUDA graph (gpu_check: empty_kernel)
PDL_RELEASE_US = 0.5  # assumed: griddepcontrol.wait's release after the previous grid (gpu_check: empty_kernel, PDL)


def step_us(pred: Prediction, pdl: bool, previous_triggers: bool = True) -> float:
    """Time per launch of ``pred``'s kernel launched back to back in a CUDA graph: its device time plus the gap
    before it, which PDL shrinks to the wait's release when the kernel before it triggers its dependents early."""
    return pred.time_us + (PDL_RELEASE_US if pdl and previous_triggers else GRAPH_GAP_US)


def pdl_gain(pred: Prediction, previous_triggers: bool = True) -> dict:
    """``{off_us, on_us, saved_us, speedup}`` per launch of ``pred``'s kernel with PDL off and on."""
    off, on = step_us(pred, False), step_us(pred, True, previous_triggers)
    return dict(off_us=off, on_us=on, saved_us=off - on, speedup=off / on)
