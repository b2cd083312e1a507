"""Two tiny stdlib-only programs the network tests start in their namespaces (fast to start).

SERVER answers every connection with the address it sees the client coming from, which is how the tests
see NAT at work; CLIENT connects, prints that answer and exits.
"""

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
