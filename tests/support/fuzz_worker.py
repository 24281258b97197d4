"""Child process of the loader fuzz test (tests/gguf/test_loader_fuzz.py): loads GGUF files one by one.

Reads one path per line on stdin; for each, `mcmoe_gguf.load(path)` and, if that succeeds, a 3-token
evaluation; answers one JSON line on stdout: {"ok": true} or {"ok": false, "type": ..., "error": ...}.
The parent times every answer and restarts this process when it dies. Its address space is capped
(argv[1] MiB) so a file that makes the loader allocate without bound fails here with MemoryError or a
refused allocation instead of exhausting the machine.
"""
from __future__ import annotations

import json
import os
import resource
import sys


def main() -> None:
    limit = int(sys.argv[1]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import mcmoe_gguf
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)            # llama.cpp prints to stdout too: keep the answer channel clean
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path = line.strip()
        try:
            llm = mcmoe_gguf.load(path, n_ctx=32, n_batch=32, n_threads=1, verbose=False)
            llm.eval([1, 2, 3])
            del llm
            ans = {"ok": True}
        except Exception as e:     # anything Python can catch is an answer; the parent judges its kind
            ans = {"ok": False, "type": type(e).__name__, "error": str(e)}
        out.write(json.dumps(ans) + "\n")


if __name__ == "__main__":
    main()
