"""The served steerers packed once per steered layer (the `SteererBank` layout): each layer holds one
`finesteer_kernels.SteerBank` of the steerers acting there, and every served name maps to its index in that bank
(-1 where the steerer has no part at the layer, so its rows are left bit-identical there)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from finesteer_kernels import SteerBank

from ...steerer import Steerer


class LayerBanks:
    """``steerers``: ``{name: Steerer}``; ``served``: the decoder layers the server steers (fixed when the model is
    loaded), each steerer must act at one of them and have the model's hidden size; ``layers``: those this process
    holds (all of them, except under pipeline parallelism), which get a bank."""

    def __init__(self, steerers: Mapping[str, Steerer], served, layers, hidden_size: int, n_layers: int, device,
                 dtype):
        self.served, self.layers, self.device, self.dtype = tuple(served), tuple(layers), device, dtype
        self.hidden_size, self.n_layers = hidden_size, n_layers
        self.steerers: dict = {}
        for name, steerer in steerers.items():
            self._check(name, steerer)
            self.steerers[name] = steerer
        self._rebuild()

    def _check(self, name: str, steerer: Steerer) -> None:
        if not 0 <= steerer.layer < self.n_layers:
            raise ValueError(f"steerer {name!r} acts at layer {steerer.layer}, but the served model has "
                             f"{self.n_layers} decoder layers (0..{self.n_layers - 1})")
        if steerer.hidden_size != self.hidden_size:
            raise ValueError(f"steerer {name!r} was fitted for hidden size {steerer.hidden_size}, but the served "
                             f"model has hidden size {self.hidden_size}")
        if steerer.layer not in self.served:
            raise ValueError(f"steerer {name!r} acts at layer {steerer.layer}, which this server does not steer "
                             f"(layers {list(self.served)}, fixed at start-up by the steerers in its configuration)")

    def _rebuild(self) -> None:
        self.names = tuple(self.steerers)
        self.alphas = np.array([s.params.alpha for s in self.steerers.values()] or [1.0], dtype=np.float64)
        self.banks: dict = {}
        self.local: dict = {}  # layer -> int64 array: [global index + 1] -> local index (-1: not at this layer)
        for layer in self.layers:
            here = {n: s.params for n, s in self.steerers.items() if s.layer == layer}
            self.banks[layer] = (SteerBank(here).to(self.device, self.dtype) if here else None)
            local = [-1] + [list(here).index(n) if n in here else -1 for n in self.names]
            self.local[layer] = np.array(local, dtype=np.int64)
            if self.banks[layer] is not None:
                self.banks[layer].pack(self.dtype, self.device)  # pack now, not inside the first forward

    def index_of(self, name) -> int:
        return -1 if name is None else self.names.index(name)

    def add(self, name: str, steerer: Steerer) -> None:
        self._check(name, steerer)
        self.steerers[name] = steerer
        self._rebuild()

    def remove(self, name: str) -> None:
        del self.steerers[name]
        self._rebuild()
