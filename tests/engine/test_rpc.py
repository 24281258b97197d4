"""One model across processes with llama.cpp's RPC backend, on loopback.

Two `ggml-rpc-server` processes of this runtime hold the two decoder layers of a mixed-width PMQ file
(one layer each); embeddings and output stay on the local CPU. With ODP on, the logits of a prompt equal
those of the same file run in one process, and the pruning counters (read in the client: the ODP op is
declined by the RPC device and runs on the local CPU) equal the single-process ones. The client work runs
in a child process: devices registered with ggml stay registered for the life of a process, and a
server that is gone when a later test loads a model would make ggml abort.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest


CLIENT = r"""
import json, sys
import numpy as np
import mcmoe_gguf
from mcmoe_gguf.engine import odp
path, servers, out = sys.argv[1], sys.argv[2], sys.argv[3]
tokens = [int(t) for t in np.random.default_rng(4).integers(3, 512, 48)]
res = {}
for name, kw in (("local", {}), ("rpc", {"rpc_servers": servers, "n_gpu_layers": 2})):
    llm = mcmoe_gguf.load(path, n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=2,
                          odp=True, mu=0.6, protect=0.05, verbose=True, **kw)
    odp.odp_reset()
    llm.eval(tokens)
    np.save(f"{out}/{name}.npy", np.array(llm.scores[:len(tokens)], dtype=np.float64))
    res[name] = [[s.layer, s.slots, s.pruned, s.tokens, s.protected] for s in odp.odp_stats(llm)]
    del llm
print("RESULT " + json.dumps(res))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def rpc_servers():
    from mcmoe_gguf.engine.runtime import rpc_probe, tools_dir
    exe = tools_dir() / "ggml-rpc-server"
    if not exe.exists():
        pytest.fail(f"{exe} missing: the runtime was built without the RPC backend (make runtime)")
    env = dict(os.environ, LD_LIBRARY_PATH=str(tools_dir()))
    procs, endpoints = [], []
    try:
        for _ in range(2):
            port = _free_port()
            procs.append(subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port), "-t", "1"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            endpoints.append(f"127.0.0.1:{port}")
        for e, p in zip(endpoints, procs):
            for _ in range(300):
                try:
                    rpc_probe(e, timeout=1.0)
                    break
                except ValueError:
                    assert p.poll() is None, f"rpc-server {e} exited: {p.stderr.read()[-2000:]}"
                    time.sleep(0.1)
            else:
                pytest.fail(f"rpc-server {e} did not start listening")
        yield endpoints
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_two_rpc_servers_equal_one_process(pmq_file, rpc_servers, tmp_path):
    r = subprocess.run([sys.executable, "-c", CLIENT, str(pmq_file), ",".join(rpc_servers), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "RESULT " in r.stdout, r.stderr[-4000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    # the layers really went to the two servers (llama.cpp's own account of its buffers)
    for e in rpc_servers:
        assert f"[{e}] model buffer size" in r.stderr or f"{e}] model buffer size" in r.stderr, r.stderr[-4000:]
    local, remote = np.load(tmp_path / "local.npy"), np.load(tmp_path / "rpc.npy")
    rel = np.abs(remote - local).max() / np.abs(local).max()
    # the same kernels, but the servers sum with their own thread count and the graph is split into more
    # pieces (measured 2e-4 of the largest logit); other layers' or types' errors are 10-100x larger
    assert rel < 1e-3, rel
    assert res["rpc"] == res["local"], res
    assert sum(s[2] for s in res["local"]) > 0, "ODP pruned nothing: the comparison of counters is empty"


def test_unreachable_server_is_a_clear_error():
    from mcmoe_gguf.engine.runtime import add_rpc_servers
    port = _free_port()                      # nothing listens there
    with pytest.raises(ValueError, match=f"RPC server 127.0.0.1:{port}: cannot connect"):
        add_rpc_servers(f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="host:port"):
        add_rpc_servers("no-port-here")


def test_rpc_server_cli_help():
    from helpers import cli
    r = cli("rpc-server", "--help")
    assert r.returncode == 0 and "no authentication" in r.stdout
