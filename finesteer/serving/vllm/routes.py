"""Opt-in HTTP routes to list, load and unload named steerers while the server runs (``vllm.endpoint_plugins``).

    VLLM_PLUGINS=finesteer,finesteer_routes python -m vllm.entrypoints.openai.api_server ...
    GET    /v1/steerers                  -> {"data": [{"name", "layer", "alpha"}, ...]}
    POST   /v1/steerers {"name": "x", "file": "x.safetensors"}   load (or replace) from the steerer folder
    DELETE /v1/steerers/x                stop accepting x (requests in flight finish with it)

The routes sit under ``/v1``, so ``--api-key`` guards them as it guards the OpenAI routes. Files are loaded only
from the steerer folder (``FINESTEER_VLLM_STEERERS`` when it names a folder, else ``FINESTEER_VLLM_STEERER_DIR``),
by base name: a client cannot make the server read an arbitrary path. A loaded steerer must act at a layer the
server already steers (the layers are fixed at start-up by its configured steerers: changing them would need a
new compiled graph). Under CUDA graphs a captured step does not see later changes to the banks, so the routes refuse
to load or unload when the server captures CUDA graphs; restart it with the new configuration instead.
"""

import os  # no `from __future__ import annotations`: FastAPI reads the routes' annotations as objects
from pathlib import Path

from .config import STEERERS_ENV, check_name
from . import names

FOLDER_ENV = "FINESTEER_VLLM_STEERER_DIR"


def steerer_folder():
    spec = os.environ.get(STEERERS_ENV, "").strip()
    if spec and "=" not in spec and Path(spec).is_dir():
        return Path(spec)
    folder = os.environ.get(FOLDER_ENV, "").strip()
    return Path(folder) if folder else None


def resolve_file(file: str) -> Path:
    folder = steerer_folder()
    if folder is None:
        raise ValueError(f"loading steerers at run time needs a steerer folder: set {STEERERS_ENV} to a folder "
                         f"or {FOLDER_ENV}")
    if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
        raise ValueError(f"file: expected the base name of a .safetensors file in {folder}, got {file!r}")
    path = folder / file
    if not path.is_file():
        raise ValueError(f"file: {path} does not exist")
    return path


class SteererRoutes:
    """The endpoint plugin (a zero-argument factory, as vLLM wants)."""

    name = "finesteer_routes"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, HTTPException, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        def refuse_under_cuda_graphs(request):
            config = getattr(request.app.state, "vllm_config", None)
            mode = getattr(getattr(config, "compilation_config", None), "cudagraph_mode", None)
            if mode is not None and getattr(mode, "name", "NONE") != "NONE":
                raise HTTPException(409, "this server captures CUDA graphs, which do not see run-time changes to "
                                         "the steerers: restart it with the new FINESTEER_VLLM_STEERERS")

        async def rpc(request, method, *args):
            try:
                return (await request.app.state.engine_client.collective_rpc(method, args=args))[0]
            except Exception as error:  # a worker's ValueError/KeyError comes back wrapped
                raise HTTPException(400, f"{method}: {error}") from None

        @router.get("/v1/steerers")
        async def list_steerers(request: Request):
            served = await rpc(request, "finesteer_names")
            return JSONResponse({"data": [{"name": n, **info} for n, info in served.items()
                                          if n in names.known_names()]})

        @router.post("/v1/steerers")
        async def load_steerer(request: Request):
            refuse_under_cuda_graphs(request)
            body = await request.json()
            try:
                name = check_name(body.get("name"))
                path = resolve_file(body.get("file", f"{name}.safetensors"))
            except (ValueError, AttributeError) as error:
                raise HTTPException(400, str(error)) from None
            await rpc(request, "finesteer_load", name, str(path))
            names.note_loaded(name)
            return JSONResponse({"loaded": name, "file": path.name})

        @router.delete("/v1/steerers/{name}")
        async def unload_steerer(request: Request, name: str):
            refuse_under_cuda_graphs(request)
            if name not in names.known_names():
                raise HTTPException(404, f"unknown steerer {name!r}: this server has {sorted(names.known_names())}")
            names.note_unloaded(name)
            await rpc(request, "finesteer_unload", name)
            return JSONResponse({"unloaded": name})

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        pass
