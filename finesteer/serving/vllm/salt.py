"""Prefix caching never mixes steerings: a steered request's KV blocks are salted with its steering.

vLLM's block hash takes a per-request ``cache_salt``. The plugin derives it in the engine process from what the
request asks for, so a user cannot forget it: token mode salts with (mode, steerer, the load of its file, alpha), since a
row's edit depends only on the rows before it; query mode adds the prompt itself, since every row's edit depends on
the prompt's last token (two prompts that share a prefix get different edits on it). Unsteered requests keep their
own salt (usually none), so they go on sharing blocks with each other and never with steered ones. A user's own
salt is kept inside the derived one.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Optional

from .config import ALPHA_KEY, GENERATION_KEY, STEERER_KEY, steering_mode


def steering_salt(extra_args, prompt_token_ids, user_salt: Optional[str], mode: str) -> Optional[str]:
    """The request's cache salt (the frontend has already checked its steering; ``GENERATION_KEY`` tells apart
    files loaded at different times under one name)."""
    if not extra_args or extra_args.get(STEERER_KEY) is None:
        return user_salt
    steering = (mode, extra_args[STEERER_KEY], extra_args.get(ALPHA_KEY), extra_args.get(GENERATION_KEY), user_salt)
    digest = hashlib.sha256(repr(steering).encode())
    if mode == "query":
        digest.update(repr(list(prompt_token_ids or ())).encode())
    return "finesteer:" + digest.hexdigest()


def wrap_from_engine_core_request(from_request):
    @functools.wraps(from_request)
    def wrapped(cls, request, *args, **kwargs):
        params = request.sampling_params
        extra = getattr(params, "extra_args", None) if params is not None else None
        if extra and extra.get(STEERER_KEY) is not None:
            request.cache_salt = steering_salt(extra, request.prompt_token_ids, request.cache_salt, steering_mode())
        return from_request.__func__(cls, request, *args, **kwargs)
    wrapped.finesteer_wrapped = True
    return classmethod(wrapped)
