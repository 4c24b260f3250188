"""The shard <-> client wire protocol: int64 headers over a `Channel`.

Every request is one header ``[op, a, b, c, d, e]``; every reply starts with
``OK`` or ``ERR``. Tensors follow a header only on the TCP transport (a gloo
`Channel`); on the shared-memory transport they are read and written in
/dev/shm while the shard holds its lock, the client says ``DONE`` when it has
finished copying, and the headers travel over a Unix socket (`LocalChannel`).

    HELLO transport numel   -> OK numel version      (then client: READY)
    PUSH  fetched_version buffer numel dtype -> [GO, then grad] OK version staleness
                            | ERR ERR_SHAPE numel (wrong size or dtype: nothing is sent)
                            | ERR ERR_NONFINITE   (NaN/inf: refused and counted)
    PULL                    -> OK version  [params] (shm: client copies, then DONE)
    SET                     -> OK  [params]          (shm: client copies, then DONE)
    VEC   op v src alpha    -> OK result | ERR ERR_VECTOR   (see ps/vectors.py)
    ACCUM buffer v replace  -> [GO, then grad] OK     (vector v += the gradient, or with
                                                       replace = 1 v = it; no rule)
    BYE                     -> OK                     (the connection ends)

Over TCP a tensor travels on its own gloo tag (`TENSOR_TAG`) and always into a
receive its side posted before the sender may send: the client posts the
parameters' receive before it sends PULL; the shard posts the gradient's
before it answers GO (a gradient is sent only after GO). gloo stages a message
that arrives before its receive, which for a model-sized tensor costs about a
quarter of the transfer.

Connection requests (a JSON object: client, transport, and for shm the names
of the client's gradient files, their length and this shard's offset in them)
go, over gloo, through the store: a client takes a ticket from the counter
``shard{S}/conns`` and writes ``shard{S}/conn/{ticket}``, and both sides open
the channel ``pg/shard{S}/conn{ticket}``. Over shm the client connects to the
shard's socket ``socket_file(S)`` in /dev/shm and sends the request there, with
the job's token.

Gradients on shm live in files the *client* creates, one per gradient buffer,
each the whole flat vector; every shard maps them and reads only its own range,
so a replica's backward pass writes straight into what the shards read and a
push moves no tensor at all: PUSH names the buffer.
"""

HELLO, PUSH, PULL, SET, BYE, DONE, READY, VEC, ACCUM, GO = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OK, ERR = 100, 101

TRANSPORT_GLOO, TRANSPORT_SHM = 0, 1
TRANSPORT_IDS = {"gloo": TRANSPORT_GLOO, "shm": TRANSPORT_SHM}

ERR_NUMEL, ERR_TRANSPORT, ERR_VECTOR, ERR_NO_RULE, ERR_SHAPE, ERR_NONFINITE = 1, 2, 3, 4, 5, 6

# dtype codes carried in a PUSH header; a shard takes float32 only
DTYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3, "int64": 4, "int32": 5,
          "other": 99}


def dtype_code(dtype) -> int:
    return DTYPES.get(str(dtype).replace("torch.", ""), DTYPES["other"])


def dtype_name(code: int) -> str:
    return next((name for name, c in DTYPES.items() if c == code), f"dtype {code}")


def conn_counter(shard: int) -> str:
    return f"shard{shard}/conns"


def conn_key(shard: int, ticket: int) -> str:
    return f"shard{shard}/conn/{ticket}"


def channel_name(shard: int, ticket: int) -> str:
    return f"pg/shard{shard}/conn{ticket}"


def socket_file(shard: int) -> str:
    return f"shard{shard}.sock"


def params_file(shard: int) -> str:
    return f"shard{shard}-params"


def grad_file(client: str, instance: str, buffer: int) -> str:
    return f"{client}-{instance}-grad{buffer}"


def valid_file_name(name: str) -> bool:
    """A job file name sent by a peer: no path separators, no parent references."""
    return bool(name) and "/" not in name and "\\" not in name and ".." not in name
