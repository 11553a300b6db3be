"""The steering state of one vLLM worker process: the served steerers (`banks.LayerBanks`), which request owns
which rows of the step's flattened batch, and, in query mode, each request's edit.

Before every forward, `prepare` reads the runner's persistent batch (request ids in batch order, rows per request,
tokens computed so far, prompt lengths: all on the host) and writes fixed buffers: per row the request's steerer
(token mode) or its delta slot (query mode), and the anchors to synthesise this step. `edit`, the body of the
custom op at each steered layer, reads only those buffers, so the same launches run whatever the batch holds
(what CUDA-graph replay needs); after the forward the buffers are reset so vLLM's dummy runs steer nothing.

Query mode, as `patch_model`: a request's anchor is the last token of its prompt. In the step whose chunk holds
that token, the anchor row is synthesised with the request's steerer and the edit (``coef @ W_out``, scaled by the
request's alpha over the steerer's) is stored in the request's slot; every row of the request in that step and
after (its decode steps) adds it. Chunks of a long prompt scheduled before the anchor's chunk get no edit (as
``generate(prefill_chunk_size=...)`` with `patch_model`). A request keeps its slot until the runner forgets its id
(finished or aborted); a preempted request that is recomputed passes its anchor again and gets the same edit.
Token mode: every row is steered on its own hidden state by its request's steerer.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

import finesteer_kernels

from .banks import LayerBanks
from .config import requested

logger = logging.getLogger("finesteer.serving.vllm")

_HISTORY = 4096  # finished requests whose gate decisions stay readable (finesteer_gates)


class SteeringRuntime:
    def __init__(self, banks: LayerBanks, mode: str, max_tokens: int, max_requests: int):
        self.banks, self.mode = banks, mode
        dev, d = banks.device, banks.hidden_size
        self.capacity = 4 * max_requests  # request slots: running plus preempted requests still known
        self.scratch = self.capacity + 1   # slot 0: no edit (zeros); 1..capacity: requests; last: padding writes
        i64 = dict(dtype=torch.int64, device=dev)
        self.row_global = torch.full((max_tokens,), -1, **i64)  # token mode: served steerer per row, -1 none
        self.row_scale = torch.ones(max_tokens, dtype=torch.float32, device=dev)
        self.row_slot = torch.zeros(max_tokens, **i64)          # query mode: delta slot per row
        self.anchor_row = torch.zeros(max_requests, **i64)
        self.anchor_global = torch.full((max_requests,), -1, **i64)
        self.anchor_slot = torch.full((max_requests,), self.scratch, **i64)
        self.anchor_scale = torch.ones(max_requests, dtype=torch.float32, device=dev)
        self.delta = {layer: torch.zeros(self.capacity + 2, d, dtype=torch.float32, device=dev)
                      for layer in banks.layers}
        self.gate = {layer: torch.zeros(self.capacity + 2, dtype=torch.bool, device=dev) for layer in banks.layers}
        self._local = {}
        self._sync_local()
        self.any_steered, self.n_anchors = False, 0
        self.steering: dict = {}  # request id -> (name, alpha) or None, parsed once per request
        self.slot_of: dict = {}   # request id -> slot (query mode)
        self.anchored: set = set()
        self._free = list(range(self.capacity, 0, -1))
        self._retiring: set = set()  # names unloaded while requests still use them
        self.history = {layer: torch.zeros(_HISTORY, dtype=torch.bool, device=dev) for layer in banks.layers}
        self.history_ids: list = [None] * _HISTORY  # (request id, its steerer's layer) at each history row
        self.n_finished = 0

    def _sync_local(self) -> None:
        self._local = {layer: torch.from_numpy(m).to(self.banks.device) for layer, m in self.banks.local.items()}
        self.alpha_of = {name: float(a) for name, a in zip(self.banks.names, self.banks.alphas)}

    # ---- per step, on the host -----------------------------------------------------------------------------
    def _steering_of(self, rid: str, runner):
        if rid not in self.steering:
            params = runner.requests[rid].sampling_params
            try:
                self.steering[rid] = requested(getattr(params, "extra_args", None), self.banks.steerers)
            except ValueError as error:
                # The frontend accepted the name, then it was unloaded before this request was scheduled (the
                # workers drop a steerer once no running request uses it; they cannot see the waiting queue).
                # Failing here would stop the engine for every request: run it unsteered, and say so.
                logger.error("finesteer: request %s runs unsteered: %s", rid, error)
                self.steering[rid] = None
        return self.steering[rid]

    def _forget_finished(self, live) -> None:
        for rid in [r for r in self.steering if r not in live]:
            wanted = self.steering.pop(rid)
            slot = self.slot_of.pop(rid, None)
            if slot is not None:
                layer = self.banks.steerers[wanted.name].layer
                if rid in self.anchored and layer in self.gate:  # (under pipeline parallelism: on its rank)
                    at = self.n_finished % _HISTORY
                    self.history[layer][at] = self.gate[layer][slot]
                    self.history_ids[at] = (rid, layer)
                    self.n_finished += 1
                for gate in self.gate.values():
                    gate[slot] = False
                self._free.append(slot)
            self.anchored.discard(rid)
        in_use = {s.name for s in self.steering.values() if s is not None}
        for name in [n for n in self._retiring if n not in in_use]:
            self._retiring.discard(name)
            self.banks.remove(name)
            self._sync_local()

    def prepare(self, runner) -> None:
        batch = runner.input_batch
        req_ids = list(batch.req_ids)
        n_req = len(req_ids)
        self._forget_finished(runner.requests)
        starts = runner.query_start_loc.np[: n_req + 1].astype(np.int64)
        counts = np.diff(starts)
        computed = batch.num_computed_tokens_cpu[:n_req].astype(np.int64)
        prompt = batch.num_prompt_tokens[:n_req].astype(np.int64)
        wanted = [self._steering_of(rid, runner) for rid in req_ids]
        scale = np.array([1.0 if w is None or w.alpha is None else w.alpha / self.alpha_of[w.name]
                          for w in wanted], dtype=np.float32)
        n_rows = int(starts[-1])
        self.any_steered = any(w is not None for w in wanted)
        self.n_anchors = 0
        if self.mode == "token":
            glob = np.array([-1 if w is None else self.banks.index_of(w.name) for w in wanted], dtype=np.int64)
            self.row_global[:n_rows].copy_(torch.from_numpy(np.repeat(glob, counts)))
            self.row_scale[:n_rows].copy_(torch.from_numpy(np.repeat(scale, counts)))
            return
        slots = np.zeros(n_req, dtype=np.int64)
        anchors = []
        for i, (rid, w) in enumerate(zip(req_ids, wanted)):
            if w is None:
                continue
            if rid not in self.slot_of:
                if not self._free:
                    raise RuntimeError(f"finesteer: more than {self.capacity} steered requests are known at once")
                self.slot_of[rid] = self._free.pop()
            anchor = prompt[i] - 1
            if computed[i] <= anchor < computed[i] + counts[i]:
                anchors.append((starts[i] + anchor - computed[i], self.banks.index_of(w.name), self.slot_of[rid],
                                scale[i]))
                self.anchored.add(rid)
            if rid in self.anchored:
                slots[i] = self.slot_of[rid]
        self.row_slot[:n_rows].copy_(torch.from_numpy(np.repeat(slots, counts)))
        self.n_anchors = n = len(anchors)
        if anchors:
            rows, glob, slot, sc = (torch.tensor(c) for c in zip(*anchors))
            self.anchor_row[:n].copy_(rows)
            self.anchor_global[:n].copy_(glob)
            self.anchor_slot[:n].copy_(slot)
            self.anchor_scale[:n].copy_(sc.float())

    def reset(self) -> None:
        """After a forward: no rows steered and no anchors, until the next `prepare` (vLLM's dummy runs)."""
        self.any_steered, self.n_anchors = False, 0
        self.row_global.fill_(-1)
        self.row_slot.zero_()
        self.anchor_row.zero_()
        self.anchor_global.fill_(-1)
        self.anchor_slot.fill_(self.scratch)
        self.anchor_scale.fill_(1.0)

    # ---- per steered layer, inside the forward (no host synchronisation) ----------------------------------
    def edit(self, stream: torch.Tensor, layer: int) -> torch.Tensor:
        """The op's body. Eager (and on the CPU) it skips work that the host already knows is void: no anchors this
        step, no steered row. Under CUDA-graph capture it runs the full fixed-size path, which every replay
        repeats whatever the step holds (the buffers say which rows and anchors are live)."""
        bank = self.banks.banks.get(layer)
        capturing = stream.is_cuda and torch.cuda.is_current_stream_capturing()
        if bank is None or not (self.any_steered or capturing):
            return stream.clone()  # a custom op's output may not alias its input
        rows = stream.shape[0]
        local = self._local[layer]
        if self.mode == "token":
            index = local[self.row_global[:rows] + 1]
            steered = finesteer_kernels.steer_bank(stream, bank, index)
            scale = self.row_scale[:rows, None]
            return torch.where(scale == 1, steered, stream + scale * (steered - stream))
        n = self.anchor_row.shape[0] if capturing else self.n_anchors
        if n:
            index = local[self.anchor_global[:n] + 1]
            coef = finesteer_kernels.synthesize_bank(stream[self.anchor_row[:n]], bank, index)
            delta = finesteer_kernels.bank_coef_delta(coef, bank, index) * self.anchor_scale[:n, None]
            self.delta[layer].index_copy_(0, self.anchor_slot[:n], delta)
            self.gate[layer].index_copy_(0, self.anchor_slot[:n], (coef != 0).any(dim=1))
        return finesteer_kernels.apply_delta(stream, self.delta[layer], self.row_slot[:rows])

    # ---- run-time changes and inspection (outside the forward) ---------------------------------------------
    def add(self, name: str, steerer) -> None:
        self._retiring.discard(name)
        if name in self.banks.steerers:
            self.banks.remove(name)
        self.banks.add(name, steerer)
        self._sync_local()

    def remove(self, name: str) -> None:
        """Unload ``name``: at once if no request in flight uses it, else when the last one finishes."""
        if name not in self.banks.steerers:
            raise KeyError(f"unknown steerer {name!r}")
        self._retiring.add(name)
        self._forget_finished(self.steering)

    def gates(self, live) -> dict:
        """``{request id: gate open}`` at the anchor of each finished steered query-mode request (the latest
        requests; reads the device: call it outside the forward). ``live``: the request ids the runner still has."""
        self._forget_finished(live)
        rows = (k % _HISTORY for k in range(max(0, self.n_finished - _HISTORY), self.n_finished))
        return {self.history_ids[k][0]: bool(self.history[self.history_ids[k][1]][k]) for k in rows}
