"""llama.cpp's RPC backend as part of lamina: `lamina rpc-server`, Model(rpc=[...]) over several
servers, the config's rpc key, and clean ConnectionErrors naming host:port for servers that do not
answer, answer too slowly, or speak another protocol version (ggml's client would abort)."""
from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import pytest

import lamina
import requires
from tiny_gguf import write_tiny_llama


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`lamina rpc-server` as a user starts it; returns it once it listens, with its endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "rpc-server", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"lamina rpc-server exited: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("lamina rpc-server did not listen within 10 s")


@pytest.fixture(scope="module")
def two_servers() -> Iterator[list[str]]:
    requires.tool("ggml-rpc-server")
    servers = [start_server("--device", "CPU", "--threads", "1") for _ in range(2)]
    yield [ep for _, ep in servers]
    # the servers stay up until the process ends (PR_SET_PDEATHSIG): a model a failing test keeps
    # alive must still find them (ggml's RPC client aborts the process if its server goes away)


def local_gpus() -> list[lamina.Device]:
    return [d for d in lamina.devices(memory=False) if d.kind in ("gpu", "igpu")]


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    yield


def greedy(model: lamina.Model) -> list[int]:
    with model.context(n_ctx=256) as ctx:
        return [int(t) for t in ctx.complete("the sky is", max_tokens=16, ignore_eos=True).tokens]


def test_a_model_split_over_the_cpu_and_two_servers_gives_the_local_tokens(tmp_path: Path,
                                                                          two_servers: list[str]) -> None:
    path = write_tiny_llama(tmp_path / "four.gguf", n_layer=4)
    local = greedy(lamina.Model(path, gpu=False))
    servers = [d for ep in two_servers for d in lamina.rpc_connect(ep)]  # only these, on a GPU machine too
    model = lamina.Model(path, rpc=two_servers, devices=servers, n_gpu_layers=3, split_mode="layer",
                         tensor_split=[1, 1])
    remote = [d for d in model.offload.devices if d.startswith("RPC")]
    assert len(remote) == 2, model.offload
    on = {d: model.offload.layers_on(d) for d in remote}
    assert all(n >= 1 for n in on.values()) and sum(on.values()) == 3, (on, str(model.offload))
    assert model.offload.layers_on("CPU") + sum(on.values()) >= 4 or "host" in str(model.offload)
    assert greedy(model) == local
    # remote devices serve only the models that name them
    with pytest.warns(lamina.InertSettingWarning) if not local_gpus() else _no_warning():
        plain = lamina.Model(path, n_gpu_layers="all")
    assert not [d for d in plain.offload.devices if d.startswith("RPC")], plain.offload
    if not local_gpus():
        assert "no RPC server named in rpc= or devices=" in plain.offload.reasons[0], plain.offload.reasons


def test_the_config_and_lamina_rpc_name_the_servers(tmp_path: Path, two_servers: list[str]) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    yml = tmp_path / "model.yml"
    yml.write_text(f"model: {path}\nngl: all\nrpc: [{two_servers[0]}]\n")
    model = lamina.Model.from_config(lamina.load_config(yml, env={}))
    assert [d for d in model.offload.devices if d.startswith("RPC")] and model.offload.layers_effective == 3
    cfg = lamina.load_config(yml, env={"LAMINA_RPC": ",".join(two_servers)})
    assert cfg["rpc"] == two_servers and cfg.source("rpc") == "env LAMINA_RPC"
    with pytest.raises(ValueError, match="host:port"):
        lamina.load_config(yml, env={"LAMINA_RPC": "nohost"})


def test_a_config_ngl_beyond_the_models_layers_is_inert_once(tmp_path: Path, two_servers: list[str]) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")  # 2 layers + output
    yml = tmp_path / "model.yml"
    yml.write_text(f"model: {path}\nngl: 40\nrpc: [{two_servers[0]}]\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = lamina.load_config(yml, env={})
        model = lamina.Model.from_config(cfg)
        with model.context(n_ctx=256) as ctx:
            ctx.complete("the sky is", max_tokens=4)
    inert = [str(w.message) for w in caught if issubclass(w.category, lamina.InertSettingWarning)]
    assert inert == [f"n_gpu_layers=40 ({yml}:2) is inert: the model has 2 layers (+1 output): 3 are offloaded"]
    assert model.offload.layers_effective == 3 and cfg.inert == inert


class FakeServer:
    """A TCP server on 127.0.0.1 that answers ggml's HELLO its own way."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.answer(conn)
                except OSError:
                    pass


def hello_from(version: tuple[int, int, int]) -> Callable[[socket.socket], None]:
    def answer(conn: socket.socket) -> None:
        conn.recv(1 + 8 + 24, socket.MSG_WAITALL)
        conn.sendall(struct.pack("<Q", 28) + bytes([*version, 0]) + bytes(24))
        conn.recv(1)  # until the client hangs up
    return answer


def test_a_server_of_another_protocol_version_raises_naming_it() -> None:
    old = FakeServer(hello_from((6, 1, 0)))
    with pytest.raises(ConnectionError, match=rf"RPC server {old.endpoint}: the server speaks RPC protocol 6\.1\.0, "
                                              r"this lamina 7\.\d+\.\d+"):
        lamina.rpc_connect(old.endpoint)
    newer = FakeServer(hello_from((7, 99, 0)))
    with pytest.raises(ConnectionError, match="protocol 7.99.0"):
        lamina.rpc_connect(newer.endpoint)


def test_a_server_that_says_nothing_or_hangs_up_raises_within_the_timeout() -> None:
    silent = FakeServer(lambda conn: (conn.recv(64), time.sleep(5)))
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"RPC server {silent.endpoint}: no RPC handshake answer within 500 ms"):
        lamina.rpc_connect(silent.endpoint, timeout=0.5)
    assert time.monotonic() - t0 < 2.0
    rude = FakeServer(lambda conn: None)  # accepts and closes
    with pytest.raises(ConnectionError, match=f"RPC server {rude.endpoint}: .*(closed the connection|connection broke)"):
        lamina.rpc_connect(rude.endpoint)
    with pytest.raises(ConnectionError, match="nothing answers there"):
        lamina.rpc_connect(f"127.0.0.1:{free_port()}", timeout=0.5)
    # an address nobody routes (TEST-NET-1): the connect itself times out, bounded by timeout
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="192.0.2.1:50052"):
        lamina.rpc_connect("192.0.2.1:50052", timeout=0.5)
    assert time.monotonic() - t0 < 2.0


def test_rpc_server_binds_loopback_and_warns_for_any_other_address() -> None:
    requires.tool("ggml-rpc-server")
    proc, endpoint = start_server("--device", "CPU", "--threads", "1")
    proc.terminate()  # the command is the server itself (exec): nothing outlives it
    _, err = proc.communicate(timeout=30)
    assert endpoint.startswith("127.0.0.1:") and "WARNING" not in err
    proc, _ = start_server("--host", "0.0.0.0", "--device", "CPU", "--threads", "1")
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "WARNING: ggml's RPC protocol has no authentication" in err and "trusted network" in err


def test_rpc_with_gpu_off_is_inert_and_connects_nothing(tiny_path: Path) -> None:
    with pytest.warns(lamina.InertSettingWarning, match="rpc=.* is inert: gpu=False"):
        model = lamina.Model(tiny_path, gpu=False, rpc=["192.0.2.1:50052"])  # never contacted
    assert model.offload.gpu is False
    with pytest.raises(TypeError, match="list"):
        lamina.Model(tiny_path, rpc="127.0.0.1:50052")  # type: ignore[arg-type]


def test_auto_fits_across_both_servers_with_their_reported_memory(tmp_path: Path, two_servers: list[str]) -> None:
    path = write_tiny_llama(tmp_path / "four.gguf", n_layer=4)
    local = greedy(lamina.Model(path, gpu=False))
    model = lamina.Model(path, rpc=two_servers, n_gpu_layers="auto", n_ctx=256)
    remote = [d for d in model.offload.devices if d.startswith("RPC")]
    assert model.offload.layers_effective == 5 and len(remote) == 2, str(model.offload)
    assert all(model.offload.layers_on(d) >= 1 for d in remote), str(model.offload)
    assert any("auto: llama.cpp's memory fit chose" in r for r in model.offload.reasons), model.offload.reasons
    assert greedy(model) == local


NETNS = ("lamina-rpc-a", "lamina-rpc-b")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[list[str]]:
    """Two RPC servers in network namespaces of their own, each joined to this one by a veth pair:
    separate hosts on 10.201.{1,2}.0/24 as far as the network stack goes (needs root and iproute2)."""
    requires.tool("ggml-rpc-server")
    try:
        for i, ns in enumerate(NETNS, 1):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", f"lrpc{i}h"], capture_output=True, timeout=30)
            _ip("netns", "add", ns)
            _ip("link", "add", f"lrpc{i}h", "type", "veth", "peer", "name", f"lrpc{i}n")
            _ip("link", "set", f"lrpc{i}n", "netns", ns)
            _ip("addr", "add", f"10.201.{i}.1/24", "dev", f"lrpc{i}h")
            _ip("link", "set", f"lrpc{i}h", "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"10.201.{i}.2/24", "dev", f"lrpc{i}n")
            _ip("netns", "exec", ns, "ip", "link", "set", f"lrpc{i}n", "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"network namespaces are not available here ({exc})")
    endpoints = []
    for i, ns in enumerate(NETNS, 1):
        port = free_port()
        subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "lamina", "rpc-server",
                          "--host", f"10.201.{i}.2", "--port", str(port), "--device", "CPU", "--threads", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        endpoints.append(f"10.201.{i}.2:{port}")
    for ep in endpoints:
        host, port = ep.rsplit(":", 1)
        for _ in range(100):
            try:
                socket.create_connection((host, int(port)), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the RPC server in its namespace did not listen at {ep} within 10 s")
    yield endpoints
    # the names go now; the namespaces (and their veths) go when the servers exit with this process
    for ns in NETNS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_two_hosts_behind_veth_pairs_serve_a_split_model(tmp_path: Path, two_hosts: list[str]) -> None:
    path = write_tiny_llama(tmp_path / "four.gguf", n_layer=4)
    local = greedy(lamina.Model(path, gpu=False))
    model = lamina.Model(path, rpc=two_hosts, n_gpu_layers=3, tensor_split=[1, 1])
    remote = [d for d in model.offload.devices if d.startswith("RPC")]
    assert len(remote) == 2 and all(model.offload.layers_on(d) >= 1 for d in remote), str(model.offload)
    descs = {d.description for d in lamina.devices(memory=False) if d.kind == "remote"}
    assert set(two_hosts) <= descs
    assert greedy(model) == local


def test_a_server_killed_mid_generation_raises_and_the_process_survives(tmp_path: Path) -> None:
    """ggml's RPC client aborted the process when its server went away; with lamina's patch
    (vendor/llama.cpp/patches) the decode raises DecodeError naming host:port, the model is closed
    (ClosedError from then on), and the process, other models and other servers go on."""
    requires.tool("ggml-rpc-server")
    requires.pinned_source()  # lamina's RPC patch
    script = f"""
import os, signal, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
import lamina
from test_rpc import start_server, greedy
from tiny_gguf import write_tiny_llama
path = write_tiny_llama({str(tmp_path / 'four.gguf')!r}, n_layer=4)
(doomed, ep), (kept, ep2) = start_server("--device", "CPU", "--threads", "1"), start_server("--device", "CPU", "--threads", "1")
model = lamina.Model(path, rpc=[ep], n_gpu_layers="all")
other = lamina.Model(path, rpc=[ep2], n_gpu_layers="all")
ctx = model.context(n_ctx=256)
gen = ctx.generate("the sky is", max_tokens=200, ignore_eos=True)
next(gen)
doomed.kill(); doomed.wait()
t0 = time.monotonic()
after = []
try:
    for piece in gen:
        after.append(piece)
    print("NO ERROR")
except lamina.DecodeError as exc:
    print("DecodeError", round(time.monotonic() - t0, 3), exc)
print("pieces after the kill", len(after))
try:
    ctx.decode([1, 2, 3])
except lamina.ClosedError as exc:
    print("ClosedError", exc)
try:
    model.context(n_ctx=64).decode([1])
except lamina.ClosedError as exc:
    print("ClosedError new context")
print("other model", greedy(other) == greedy(lamina.Model(path, gpu=False)))
lost = [d for d in lamina.devices() if d.description == ep]  # not asked again: ggml would abort reconnecting
print("lost device memory", [d.memory_total for d in lost])
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = r.stdout
    assert r.returncode == 0 and "survived" in out, (r.returncode, out, r.stderr[-3000:])
    assert "DecodeError" in out and "went away" in out and "127.0.0.1:" in out, out
    assert "ClosedError RPC server 127.0.0.1:" in out and "ClosedError new context" in out, out
    assert "other model True" in out, out
    # nothing computed from the dead server's zeros came out: the first decode after the kill raised
    assert "pieces after the kill 0" in out, out
    assert "lost device memory [None]" in out, out


def run_isolated(script: str) -> str:
    """A script in its own process: a lost server stays lost for the whole process, and a
    regression (ggml's abort) must fail this test, not end the suite."""
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n" + script],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stdout, r.stderr[-3000:])
    return r.stdout


def test_a_server_that_went_away_while_nothing_was_connected_raises_and_is_not_asked(tmp_path: Path) -> None:
    """ggml connects anew for each question once no model holds a connection; it aborted the
    process when that connection failed (lamina.devices() after a server stopped did)."""
    requires.tool("ggml-rpc-server")
    requires.pinned_source()  # lamina's RPC patch
    out = run_isolated(f"""
import lamina
from test_rpc import start_server
from tiny_gguf import write_tiny_llama
path = write_tiny_llama({str(tmp_path / 'four.gguf')!r}, n_layer=4)
proc, ep = start_server("--device", "CPU", "--threads", "1")
(dev,) = lamina.rpc_connect(ep)
print("memory before", dev.memory_total > 0)
proc.kill(); proc.wait()
print("memory after", [d.memory_total for d in lamina.devices() if d.description == ep])

def attempt(f):
    try:
        f()
        print("NO ERROR")
    except ConnectionError as exc:
        print("ConnectionError", exc)
for f in (lambda: lamina.rpc_connect(ep), lambda: lamina.Model(path, rpc=[ep], n_gpu_layers="all"),
          lambda: lamina.Model(path, devices=[dev], n_gpu_layers="all"), lambda: lamina.Model(path, devices=[dev])):
    attempt(f)
# nothing asked the next two since they went away: a load ("auto" fits first) and rpc_connect
(p2, ep2), (p3, ep3) = start_server("--device", "CPU", "--threads", "1"), start_server("--device", "CPU", "--threads", "1")
(dev2,), _ = lamina.rpc_connect(ep2), lamina.rpc_connect(ep3)
for p in (p2, p3):
    p.kill(); p.wait()
attempt(lambda: lamina.Model(path, devices=[dev2]))
attempt(lambda: lamina.rpc_connect(ep3, timeout=0.5))
print("cpu", lamina.Model(path, gpu=False).context(n_ctx=64).complete("a", max_tokens=2).text is not None)
print("survived")
""")
    assert "memory before True" in out and "memory after [None]" in out, out
    assert "NO ERROR" not in out and out.count("went away") == 5 and "nothing answers there" in out, out


def test_a_server_that_fails_ggmls_own_connection_raises_naming_it() -> None:
    """lamina's handshake passes, then ggml's connection is refused, or its first answer is
    malformed: ggml aborted the process; now the endpoint is lost and rpc_connect raises."""
    requires.pinned_source()  # lamina's RPC patch
    out = run_isolated("""
import socket, struct
import lamina
from test_rpc import FakeServer, hello_from

def once_then_closed():
    answered = []
    def answer(conn):
        if not answered:
            answered.append(1)
            hello_from((7, 0, 0))(conn)
    return answer

def hello_then_garbage(conn):
    conn.recv(1 + 8 + 24, socket.MSG_WAITALL)
    conn.sendall(struct.pack("<Q", 28) + bytes([7, 0, 0, 0]) + bytes(24))
    if conn.recv(9, socket.MSG_WAITALL):  # the next command: a malformed answer
        conn.sendall(struct.pack("<Q", 999) + bytes(999))
    conn.recv(1)

for server in (FakeServer(once_then_closed()), FakeServer(hello_then_garbage)):
    try:
        lamina.rpc_connect(server.endpoint)
        print("NO ERROR")
    except ConnectionError as exc:
        print("ConnectionError", exc)
print("devices", len(lamina.devices()))
print("survived")
""")
    assert "NO ERROR" not in out and out.count("went away as ggml connected") == 2, out
