"""The OpenAI-compatible server with the plugin and its routes: started on 127.0.0.1 (the CPU build has no
`vllm serve`), driven with the real `openai` client, stopped at the end."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from engines import BENIGN, HARMFUL, MAX_TOKENS, chat, reference_tokens

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, steerer_files, compile_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    for name in ("safety", "shift"):
        shutil.copy(steerer_files / f"{name}.safetensors", folder)
    port = free_port()
    env = dict(os.environ, FINESTEER_VLLM_STEERERS=str(folder), VLLM_PLUGINS="finesteer,finesteer_routes",
               VLLM_CACHE_ROOT=compile_cache)
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2[2],
                             "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "512",
                             "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--enforce-eager",
                             "--seed", "0"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("the server did not start:\n" + (folder / "server.log").read_text()[-3000:])
                time.sleep(2)
        yield base, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def complete(base, prompt, **xargs):
    extra = {"vllm_xargs": xargs} if xargs else {}
    return client(base).completions.create(model="smollm2", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body=extra).choices[0].text


def request(base, method, path, body=None, key=KEY):
    import json

    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_completions_are_steered_per_request_as_patch_model(server, smollm2, steerer_files):
    base, _ = server
    model, tokenizer, _ = smollm2
    for prompt, name in [(HARMFUL[0], "safety"), (BENIGN[1], "shift"), (BENIGN[2], None)]:
        text = chat(tokenizer, prompt)
        got = complete(base, text, **({"steerer": name} if name else {}))
        path = None if name is None else steerer_files / f"{name}.safetensors"
        assert got == tokenizer.decode(reference_tokens(model, tokenizer, text, path)[0], skip_special_tokens=True)


def test_chat_and_unknown_steerer(server):
    base, _ = server
    reply = client(base).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": BENIGN[0]}], max_tokens=8, temperature=0,
        extra_body={"vllm_xargs": {"steerer": "shift"}})
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="unknown steerer 'nope'"):
        complete(base, "Hello", steerer="nope")


def test_steerer_routes_load_list_unload_behind_the_api_key(server, steerer_files):
    base, folder = server
    assert request(base, "GET", "/v1/steerers", key=None)[0] == 401
    status, listed = request(base, "GET", "/v1/steerers")
    assert status == 200 and sorted(s["name"] for s in listed["data"]) == ["safety", "shift"]
    shutil.copy(steerer_files / "shift.safetensors", folder / "again.safetensors")
    assert request(base, "POST", "/v1/steerers", {"name": "again"})[0] == 200
    assert request(base, "POST", "/v1/steerers", {"name": "x", "file": "../etc.safetensors"})[0] == 400
    assert complete(base, "Hello", steerer="again") == complete(base, "Hello", steerer="shift")
    assert request(base, "DELETE", "/v1/steerers/again")[0] == 200
    assert request(base, "DELETE", "/v1/steerers/again")[0] == 404
    with pytest.raises(openai.BadRequestError, match="unknown steerer 'again'"):
        complete(base, "Hello", steerer="again")


def test_aborted_stream_leaves_the_next_request_right(server):
    base, _ = server
    expected = complete(base, "Tell me a story.", steerer="shift")
    stream = client(base).completions.create(model="smollm2", prompt="Tell me a story.", max_tokens=200,
                                             temperature=0, stream=True,
                                             extra_body={"vllm_xargs": {"steerer": "shift"}})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the server aborts the request mid-flight
    assert complete(base, "Tell me a story.", steerer="shift") == expected
