"""The data server <-> replica wire protocol: int64 headers over two `Channel`s.

A replica asks for its stream through the store, like a parameter-server
client: it reads the server's ``dataserver{D}/generation`` (published once the
server has loaded the data), takes a ticket from the counter
``dataserver{D}/conns`` and writes ``dataserver{D}/conn/{ticket}``::

    {"client": "replica3", "replica": 3, "generation": G, "start": S, "total": T}

Only the server of generation G answers (a replacement started after a crash
has the next generation), so a request never reaches a process that is gone.
Both sides then open two channels: ``.../down`` carries the batches and
``.../up`` the replica's credits, so neither side ever waits on a send while
the other does (a gloo send completes only once the peer posts its receive)::

    up:    CREDIT n            the replica may take n more batches
           BYE                 the replica has every batch it asked for
    down:  BATCH step n [x (n, *input_shape) float32] [y (n, *target_shape) task dtype]
           END                 the server is shutting down: connect elsewhere

Both ends know the shapes from the job description (`distbelief.data.feed.known_shapes`)
and y's dtype from the job's task (`distbelief.task.Task.target_dtype`): int64
class ids (n,) or token ids (n, T), float32 regression targets (n, *S).

The server sends step S, S+1, ..., T-1 in order, and only while it holds
credit: the replica grants ``prefetch`` at the start and one per batch it
trains on, so at most ``prefetch`` batches are ever in flight (bounded memory).
"""

CREDIT, BYE, BATCH, END = 1, 2, 3, 4


def generation_key(server: int) -> str:
    return f"dataserver{server}/generation"


def conn_counter(server: int) -> str:
    return f"dataserver{server}/conns"


def conn_key(server: int, ticket: int) -> str:
    return f"dataserver{server}/conn/{ticket}"


def channel_name(server: int, generation: int, ticket: int, direction: str) -> str:
    return f"pg/dataserver{server}/g{generation}/conn{ticket}/{direction}"


def served_key(server: int) -> str:
    """Counter of the batches a data server (all its generations) sent."""
    return f"dataserver{server}/served"


def restart_key(server: int) -> str:
    return f"restart/dataserver{server}"


def stats_key(server: int) -> str:
    return f"stats/dataserver{server}"
