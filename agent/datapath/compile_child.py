"""The compile child: `python -m agent.datapath.compile_child FD`, started by loader.compile_and_load.

Role: compile bpf/sock.c with bcc and load its programs in a process of its own, send the program
fds to the parent over the unix socket FD (SCM_RIGHTS) and exit, taking bcc and LLVM's memory
with it. Reads one JSON request on stdin: {"cflags": [...], "hooks": [...]}. Answers with one
message: {"hooks": [...]} carrying one fd per hook in that order, or {"error": "<one sentence>"}.

May touch: what compiling touches (the pinned maps bcc creates or reuses); nothing is attached.
"""

from __future__ import annotations

import json
import socket
import sys

from agent.datapath import loader
from agent.errors import UserError


def main(argv: list[str]) -> int:
    answer = socket.socket(fileno=int(argv[0]))
    request = json.load(sys.stdin)
    try:
        bpf, fds = loader.compile_here(request["cflags"], request["hooks"])
    except UserError as err:
        answer.send(json.dumps({"error": str(err)}).encode())
        return 1
    hooks = list(fds)
    socket.send_fds(answer, [json.dumps({"hooks": hooks}).encode()], [fds[hook] for hook in hooks])
    bpf.cleanup()  # our copies only: the parent holds its own now
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
