"""Two tiny stdlib-only programs the network tests start in their namespaces (fast to start).

SERVER answers every connection with the address it sees the client coming from, which is how the tests
see NAT at work; CLIENT connects, prints that answer and exits.
"""

import os
import subprocess
import sys

PYTHON = os.path.realpath(sys.executable)  # stdlib only: the base interpreter starts fastest

SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(8)
print("ready", flush=True)
while True:
    client, peer = server.accept()
    client.sendall(peer[0].encode())
    client.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as connection:
    print(connection.recv(100).decode())
"""


def connect(prefix: list[str], address: str, port: int) -> str:
    """Connect from the namespace ``prefix`` enters; return what the server saw as our address."""
    result = subprocess.run([*prefix, PYTHON, "-c", CLIENT, address, str(port)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 0, f"connecting to {address}:{port} failed: {result.stderr.strip()}"
    return result.stdout.strip()


def cannot_connect(prefix: list[str], address: str, port: int) -> bool:
    return subprocess.run([*prefix, PYTHON, "-c", CLIENT, address, str(port)], capture_output=True,
                          timeout=20).returncode != 0


class Server:
    """SERVER started with ``prefix`` (nsenter or ip netns exec); stopped at the end of the block."""

    def __init__(self, prefix: list[str], port: int):
        self.process = subprocess.Popen([*prefix, PYTHON, "-c", SERVER, str(port)],
                                        stdout=subprocess.PIPE, text=True)

    def __enter__(self):
        assert self.process.stdout.readline().strip() == "ready"
        return self

    def __exit__(self, *exc_info):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()
