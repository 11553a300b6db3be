"""Requests are checked in the frontend, before they reach the engine: vLLM calls ``validate_params`` of every
installed logits-processor plugin for each request, and a ValueError there fails that request alone (HTTP 400 on
the server). The processor itself leaves the logits untouched."""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .config import GENERATION_KEY, requested
from .names import generation, known_names, plugin_enabled


class SteeringRequests(LogitsProcessor):
    """Registered under ``vllm.logits_processors``: checks ``extra_args["steerer"]`` / ``["alpha"]``."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = sampling_params.extra_args
        if extra and extra.get("steerer") is not None and not plugin_enabled():
            raise ValueError("this server does not load the finesteer plugin (VLLM_PLUGINS leaves it out), so it "
                             "cannot steer; add 'finesteer' to VLLM_PLUGINS")
        wanted = requested(extra, known_names())
        if wanted is not None:
            extra[GENERATION_KEY] = generation(wanted.name)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
