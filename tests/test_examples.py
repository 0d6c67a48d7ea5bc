"""examples/fastapi_app.py, run the way it is deployed: uvicorn serving the
app in-process under asyncio (on a pre-bound loopback port-0 socket), the
broker opened by the app's lifespan, the asyncio side busy with its own
tasks all along; driven with httpx, and observed by a pimcore SDK client
(trio, in a thread) logged in with a token the app minted."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

for _mod in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_mod, reason=f"the FastAPI example needs {_mod}: pip install -e '.[test]'")

import httpx  # noqa: E402
import trio  # noqa: E402
import uvicorn  # noqa: E402

from pimcore.client import open_client  # noqa: E402
from pimcore.ids import SYSTEM  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


class Recorder:
    """A PushSender that keeps what it was given."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, note: Any) -> None:
        self.sent.append(note)


def sdk_client_in_a_thread(url: str, token: str, ready: threading.Event, n: int, out: list[Any],
                           release: threading.Event) -> threading.Thread:
    """bob's phone: logs in, sets ``ready``, collects ``n`` messages into
    ``out``, stays online until ``release``."""

    async def bob() -> None:
        with trio.fail_after(30):
            async with open_client(url, token, "phone") as client:
                ready.set()
                async for m in client.messages():
                    out.append((m.sender, m.device, m.payload, m.seq))
                    if len(out) == n:
                        break
                await trio.to_thread.run_sync(release.wait, 20)

    def run() -> None:
        try:
            trio.run(bob)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            out.append(exc)
            ready.set()

    t = threading.Thread(target=run, name="sdk-client", daemon=True)
    t.start()
    return t


def test_the_fastapi_example_posts_mints_tokens_and_forwards_pushes(tmp_path: Path) -> None:
    example = load_example()
    recorder = Recorder()
    app = example.create_app(data_dir=str(tmp_path / "chat-data"), listen=["tcp://127.0.0.1:0"], push_sender=recorder)
    webhook_hits: list[dict[str, Any]] = []

    @app.post("/test-push-sink")
    async def sink(note: dict[str, Any]) -> dict[str, str]:  # the URL sender's target
        webhook_hits.append(note)
        return {"ok": "yes"}

    async def main() -> None:
        ticks = 0
        stop = asyncio.Event()

        async def busy() -> None:  # the asyncio app's own work, all along
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        busy_task = asyncio.create_task(busy())
        release = threading.Event()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                assert not serving.done(), "uvicorn stopped while starting"
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as web:
                r = await web.post("/groups", json={"conv": "team", "members": ["alice", "bob"]})
                assert r.status_code == 201 and r.json() == {"conv": "team", "members": ["alice", "bob"]}
                r = await web.post("/tokens", json={"user": "bob", "device": "phone", "ttl": 600})
                assert r.status_code == 201
                minted = r.json()
                assert minted["url"].startswith("tcp://127.0.0.1:")

                ready, got = threading.Event(), []
                thread = sdk_client_in_a_thread(minted["url"], minted["token"], ready, 2, got, release)
                assert await asyncio.to_thread(ready.wait, 20) and not got, got
                while (await web.get("/users/bob/devices")).json()["online"] != ["phone"]:
                    await asyncio.sleep(0.01)

                ticks_before = ticks
                # As the system (alice is offline: one push for her), then as alice (no push:
                # bob is online, alice is the sender).
                r = await web.post("/conversations/team/messages", json={"text": "welcome!", "idempotency_key": "w1"})
                assert r.status_code == 201 and r.json()["seq"] == 1 and r.json()["duplicate"] is False
                again = await web.post("/conversations/team/messages", json={"text": "welcome!", "idempotency_key": "w1"})
                assert again.json() == {**r.json(), "duplicate": True}
                r = await web.post("/conversations/team/messages", json={"text": "hi bob", "sender": "alice"})
                assert r.status_code == 201 and r.json()["seq"] == 2
                r = await web.post("/conversations/team/messages", json={"text": "x", "sender": "mallory"})
                assert r.status_code == 403 and r.json()["detail"] == "NOT_MEMBER"
                assert (await web.post("/conversations/nope/messages", json={"text": "x"})).status_code == 404
                # Bad input is a 4xx, never a 500 (a new user's trial).
                for bad in ("/users/bad%20user/unread", "/users/bad%20user/devices"):
                    r = await web.get(bad)
                    assert (r.status_code, r.json()["detail"]) == (400, "BAD_REQUEST"), bad
                r = await web.post("/conversations/team/messages", content=b'{"text": "\\ud800"}',
                                   headers={"content-type": "application/json"})
                assert r.status_code == 400 and "lone surrogate" in r.json()["detail"]

                im = app.state.im
                while True:  # the forwarder acks each event after forwarding it
                    cursor, last = await im.event_cursor("push")
                    if cursor == last and last >= 2:
                        break
                    await asyncio.sleep(0.01)
                # The URL sender against a real endpoint: a second consumer, from the start.
                hook = example.WebhookPushSender(f"http://127.0.0.1:{port}/test-push-sink")
                fwd = asyncio.create_task(example.forward_pushes(im, hook, consumer="webhook"))
                while (await im.event_cursor("webhook"))[0] < last:
                    await asyncio.sleep(0.01)
                fwd.cancel()
                await asyncio.gather(fwd, return_exceptions=True)
                await hook.aclose()
                assert [(h["user"], h["seq"], h["preview"]) for h in webhook_hits] == [("alice", 1, "welcome!")]
                release.set()  # bob stayed online until both messages were forwarded
                await asyncio.to_thread(thread.join, 20)
                assert got == [(SYSTEM, SYSTEM, b"welcome!", 1), ("alice", "web", b"hi bob", 2)]
                assert [(n.user, n.conv, n.seq, n.sender, n.preview) for n in recorder.sent] == [
                    ("alice", "team", 1, SYSTEM, "welcome!")]
                assert ticks > ticks_before  # the asyncio side was never starved
        finally:
            release.set()
            server.should_exit = True
            await serving
            stop.set()
            await busy_task
        assert ticks > 10

    asyncio.run(asyncio.wait_for(main(), 60))
    # The lifespan closed the broker: its store can be opened again.
    from pimcore.store import LmdbStore

    LmdbStore(tmp_path / "chat-data" / "store").close()


def test_the_documented_uvicorn_run_shows_the_pushes(tmp_path: Path) -> None:
    """``uvicorn examples.fastapi_app:app`` as the docstring says, nothing
    else configuring logging: LogPushSender's lines are on its output."""
    import os
    import subprocess
    import time

    root = EXAMPLE.parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PIMCORE_DATA_DIR": str(tmp_path / "chat-data"), "PIMCORE_LISTEN": "tcp://127.0.0.1:0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("PUSH_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(f"{base}/groups", json={"conv": "team", "members": ["alice", "bob"]})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        assert r.status_code == 201, r.text
        assert httpx.post(f"{base}/conversations/team/messages", json={"text": "welcome!"}).status_code == 201
        time.sleep(2)  # the forwarder logs the two pushes (alice and bob are offline)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "push to alice: welcome! in team #1" in out and "push to bob: welcome! in team #1" in out, out
