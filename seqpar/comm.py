"""Communication shared by every primitive: group helpers, a ring exchange, autograd-aware collectives, and
a byte counter.

Byte accounting (what ``ByteCounter`` records per rank, for a payload of ``b`` bytes per rank, N ranks):

========================  ===========================  ===========================
operation                 sent                         received
========================  ===========================  ===========================
ring send/recv (P2P)      bytes of the sent tensor     bytes of the received tensor
all_gather                (N-1) * b                    (N-1) * b
reduce_scatter (in: N*b)  (N-1) * b                    (N-1) * b
all_to_all (in: b)        b * (N-1) / N                b * (N-1) / N
broadcast                 root: (N-1) * b, others 0    root: 0, others b
all_reduce                2 * b * (N-1) / N            2 * b * (N-1) / N  (ring algorithm)
========================  ===========================  ===========================

These are the payloads each rank must exchange with the others (what a ring or pairwise algorithm
moves), not what a particular backend happens to put on the wire. A rank's own piece is never counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None
Blocks = torch.Tensor | tuple[torch.Tensor, ...]  # what a ring step carries: one tensor or several, unpacked

# torch >= 2.13 renamed the flat-tensor collectives; keep working on older releases.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# ---------------------------------------------------------------------------------------------- groups


def group_size(group: Group) -> int:
    """Ranks in ``group``; ``None`` is a single device (no communication), not the world."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def global_rank(group: Group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


# ---------------------------------------------------------------------------------------------- counting


@dataclass
class ByteCounter:
    """Bytes this rank sent and received per operation while the counter was active.

    >>> with ByteCounter() as c:
    ...     out = ring_attention(q, k, v, group=g)
    >>> c.sent, c.by_op["ring"]
    """

    sent: int = 0
    received: int = 0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received
        self.calls += 1
        self.by_op[op] += sent

    def __enter__(self) -> ByteCounter:
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)


# Active counters. A plain list (not a ContextVar) because backward passes may run on autograd's own
# threads, and their communication must still be counted.
_ACTIVE: list[ByteCounter] = []


def record_bytes(op: str, sent: float, received: float) -> None:
    """Account ``sent``/``received`` bytes of a communication made outside this module (P2P halos, reduces)."""
    for counter in _ACTIVE:
        counter.add(op, int(sent), int(received))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------- ring


class RingComm:
    """Send to the next rank and receive from the previous one, with one exchange in flight.

    Usage in a ring loop (the next block travels while the current one is used)::

        ring = RingComm(group)
        for step in range(n):
            if step + 1 < n:
                nxt = ring.send_recv(cur)      # posts isend/irecv, returns the receive buffer
            compute(cur)
            if step + 1 < n:
                ring.wait(); cur = nxt

    ``wrap=False`` opens the ring into a chain (S2-Attn's halo): the last rank in the direction of travel
    sends nothing and the first receives nothing (``send_recv`` then returns None). ``op`` names the bytes
    in ``ByteCounter``.
    """

    def __init__(self, group: Group, *, reverse: bool = False, wrap: bool = True, op: str = "ring"):
        self.group, self.op = group, op
        self.world = group_size(group)
        rank = group_rank(group)
        step = -1 if reverse else 1
        self.sends = wrap or 0 <= rank + step < self.world
        self.receives = wrap or 0 <= rank - step < self.world
        self.send_to = global_rank(group, (rank + step) % self.world)
        self.recv_from = global_rank(group, (rank - step) % self.world)
        self._pending: list[dist.Work] = []
        self._sent: tuple[torch.Tensor, ...] = ()

    def send_recv(self, tensor: Blocks, out: Blocks | None = None) -> Blocks | None:
        """Post a send of ``tensor`` (a tensor, or a tuple of tensors sent as they are: no packing copy) and a
        receive into ``out`` (new buffers if None); returns ``out`` (None where an open ring receives nothing;
        ``tensor`` also gives the shapes to receive)."""
        if self._pending:
            raise RuntimeError("RingComm.send_recv called while an exchange is in flight: call wait() first")
        many = not isinstance(tensor, torch.Tensor)
        sends = tuple(t.contiguous() for t in tensor) if many else (tensor.contiguous(),)  # gloo refuses views
        if not self.receives:
            recvs = None
        elif self.world == 1:  # a ring of one: the block comes back to ourselves
            if out is None:
                return tensor
            for o, t in zip(out if many else (out,), sends):
                o.copy_(t)
            return out
        else:
            recvs = tuple(torch.empty_like(t) for t in sends) if out is None else (tuple(out) if many else (out,))
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group) for t in sends] if self.sends else []
        ops += [dist.P2POp(dist.irecv, r, self.recv_from, self.group) for r in recvs] if recvs is not None else []
        if ops:
            self._sent = sends  # an isend reads its buffer until wait(): keep it alive
            self._pending = dist.batch_isend_irecv(ops)
            record_bytes(self.op, sum(map(nbytes, sends)) if self.sends else 0,
                         0 if recvs is None else sum(map(nbytes, recvs)))
        if recvs is None:
            return None
        return recvs if many else recvs[0]

    def wait(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending, self._sent = [], ()


def ring_visit(x: Blocks, group: Group, visit, *, grad: bool = False, reuse_input: bool = False,
               grad_dtype: torch.dtype | None = None):
    """A block goes round the ring and (with ``grad``) its gradient follows: call ``visit(src, x_src)`` for
    the block of every rank ``src = rank - step``, the next block already in flight (ring and RSA attention).
    ``x`` is a tensor or a tuple of tensors (K and V travel as they are: no packed copy of the caller's).

    With ``grad``, ``visit`` returns this rank's share of the gradient of ``x_src``: tensors shaped like it, or
    a function adding the share into the travelling sum in place (no zeroed buffer per step), or None. The
    sum of the earlier ranks' shares arrives while the block is computed; the share is added into that
    received buffer, which then travels on, so after N hops each rank holds, and this returns, the summed
    gradient of its own ``x`` (in ``grad_dtype``, default x's). ``reuse_input``: ``x`` belongs to the caller's
    temporaries and may receive. Bytes per rank: (N-1)·|x| for the blocks, plus N·|grad| with ``grad`` when
    N > 1 (op ``"ring"``).
    """
    n, rank = group_size(group), group_rank(group)
    many = not isinstance(x, torch.Tensor)
    ring, grad_ring = RingComm(group), (RingComm(group) if grad else None)
    x = tuple(t.contiguous() for t in x) if many else x.contiguous()
    cur, spare, total = x, None, None
    for step in range(n):
        src = (rank - step) % n
        nxt = ring.send_recv(cur, out=spare) if step + 1 < n else None  # the next block in flight
        if grad and step > 0:
            # The earlier ranks' sum for block src (sent when the previous rank finished its last block, as we
            # sent ours) is in, and ours has left: waiting before the block, not after it, frees the sent
            # buffer before the block's gradients exist (one |grad| buffer less, for one transfer not overlapped).
            grad_ring.wait()
        part = visit(src, cur)
        if grad:
            if step == 0 and (part is None or callable(part)):  # a zero sum to add the first share into
                like = x if many else (x,)
                zeros = [torch.zeros(t.shape, dtype=grad_dtype or t.dtype, device=t.device) for t in like]
                total = tuple(zeros) if many else zeros[0]
                del zeros  # the buffer lives as long as it travels, not for the whole loop
            if callable(part):
                part(total)
            elif part is not None and total is None:
                total = part
            elif part is not None:
                for t, p in zip(total if many else (total,), part if many else (part,)):
                    t += p
            del part
            total = grad_ring.send_recv(total)  # travels with the block; the N-th hop brings it home
        if nxt is not None:
            ring.wait()
            # the visited block becomes the next receive buffer, unless it is the caller's x
            cur, spare = nxt, (None if cur is x and not reuse_input else cur)
    if grad:
        grad_ring.wait()
    return total


def chain_scan(x: torch.Tensor, step, group: Group, *, reverse: bool = False) -> torch.Tensor:
    """Serial chain over the group (LASP-1's prefix pass): rank r receives ``carry`` from rank r-1
    (zeros on rank 0), sends ``step(carry)`` to rank r+1, and returns ``carry``. ``reverse`` runs from the
    last rank down. ``x`` gives the carry's shape and dtype. Each rank sends and receives at most one
    tensor (N-1 hops in all).
    """
    n, rank = group_size(group), group_rank(group)
    pos = n - 1 - rank if reverse else rank  # place in the chain
    nxt, prev = (rank - 1, rank + 1) if reverse else (rank + 1, rank - 1)
    carry = torch.zeros_like(x).contiguous()
    if pos > 0:
        dist.recv(carry, src=global_rank(group, prev), group=group)
        record_bytes("p2p", 0, nbytes(carry))
    if pos < n - 1:
        out = step(carry).contiguous()
        record_bytes("p2p", nbytes(out), 0)
        dist.send(out, dst=global_rank(group, nxt), group=group)
    return carry


# ---------------------------------------------------------------------------------------------- collectives


def all_gather_tensor(x: torch.Tensor, group: Group, dim: int = 0, *, async_op: bool = False):
    """Concatenate every rank's ``x`` along ``dim``. With ``async_op`` returns ``(work, finish)``:
    call ``finish()`` after the overlapped compute to wait and get the gathered tensor."""
    n = group_size(group)
    if n == 1:
        return (None, lambda: x) if async_op else x
    x = x.contiguous()
    flat = x.new_empty((n * x.shape[0], *x.shape[1:]))  # rank-major along dim 0
    record_bytes("all_gather", (n - 1) * nbytes(x), (n - 1) * nbytes(x))
    work = _all_gather_flat(flat, x, group=group, async_op=async_op)

    def finish() -> torch.Tensor:
        if work is not None:
            work.wait()
        return flat if dim == 0 else torch.cat(flat.chunk(n, dim=0), dim=dim)

    return (work, finish) if async_op else finish()


def reduce_scatter_tensor(x: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's ``1/N`` slice along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} is not divisible by group size {n}")
    pieces = x.contiguous() if dim == 0 else torch.cat(x.chunk(n, dim=dim), dim=0).contiguous()
    out = pieces.new_empty((pieces.shape[0] // n, *pieces.shape[1:]))
    record_bytes("reduce_scatter", nbytes(out) * (n - 1), nbytes(out) * (n - 1))
    _reduce_scatter_flat(out, pieces, group=group)
    return out


def all_to_all_tensor(x: torch.Tensor, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into N pieces along ``scatter_dim``, send piece j to rank j, concatenate what arrives
    along ``gather_dim``.

    The pieces are sent from a view of ``x`` when it is already laid out rank-major (a sequence split of a
    ``[1, L, H, D]`` tensor: no copy), and the result is one copy of the receive buffer at most: no stacked
    send copy and no concatenation next to it.
    """
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[scatter_dim] % n:
        raise ValueError(
            f"all_to_all: size {x.shape[scatter_dim]} of dim {scatter_dim} is not divisible by group size {n}"
        )
    send = x.unflatten(scatter_dim, (n, -1)).movedim(scatter_dim, 0).contiguous()
    recv = all_to_all_buffer(send, group)
    del send
    return recv.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1).contiguous()


def all_to_all_buffer(send: torch.Tensor, group: Group) -> torch.Tensor:
    """``recv[j] = `` rank j's ``send[rank]``: one all-to-all of a contiguous ``[N, ...]`` buffer."""
    n = group_size(group)
    recv = torch.empty_like(send)
    record_bytes("all_to_all", nbytes(send) * (n - 1) / n, nbytes(send) * (n - 1) / n)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def broadcast_tensor(x: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """Broadcast from group rank ``src``; every rank passes a tensor of the same shape."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    root = group_rank(group) == src
    record_bytes("broadcast", (n - 1) * nbytes(x) if root else 0, 0 if root else nbytes(x))
    dist.broadcast(x, src=global_rank(group, src), group=group)
    return x


def reduce_tensor(x: torch.Tensor, group: Group, dst: int = 0) -> torch.Tensor:
    """Sum ``x`` over the group onto group rank ``dst`` (other ranks' result is meaningless)."""
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    root = group_rank(group) == dst
    record_bytes("reduce", 0 if root else nbytes(x), (n - 1) * nbytes(x) if root else 0)
    dist.reduce(x, dst=global_rank(group, dst), group=group)
    return x


def all_reduce_tensor(x: torch.Tensor, group: Group, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    record_bytes("all_reduce", 2 * nbytes(x) * (n - 1) / n, 2 * nbytes(x) * (n - 1) / n)
    dist.all_reduce(x, op=op, group=group)
    return x


def world_sum(value: torch.Tensor) -> torch.Tensor:
    """A copy of ``value`` summed over every rank of the default group (all SP and DP ranks), or ``value``
    itself outside a distributed run: the trainers' global token counts and losses."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    return all_reduce_tensor(value.clone(), dist.group.WORLD)


# ---------------------------------------------------------------------------------------------- autograd


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather_tensor(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        # Each rank's loss used the whole gathered tensor: the gradient of its piece is the sum over ranks.
        return reduce_scatter_tensor(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter_tensor(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_tensor(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return all_to_all_tensor(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return all_to_all_tensor(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def all_gather(x: torch.Tensor, *, group: Group, dim: int = 0) -> torch.Tensor:
    """Autograd-aware all-gather along ``dim``; backward reduce-scatters (sums) the gradient."""
    return _AllGather.apply(x, group, dim)


def reduce_scatter(x: torch.Tensor, *, group: Group, dim: int = 0) -> torch.Tensor:
    """Autograd-aware reduce-scatter (sum) along ``dim``; backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, group, dim)


def all_to_all(x: torch.Tensor, *, group: Group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Autograd-aware all-to-all; backward is the all-to-all with the two dims swapped."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def check_same_shapes(*, group: Group, **tensors: torch.Tensor) -> None:
    """Raise on every rank if any named tensor differs in shape or dtype across the group (one collective).

    A mismatch would otherwise hang or corrupt the next collective, so primitives call this first.
    Implemented by ``seqpar.attention.checks.check_same_inputs`` (the one place for input checks).
    """
    from seqpar.attention.checks import check_same_inputs

    check_same_inputs(group, **tensors)


def check_same_shape(x: torch.Tensor, *, group: Group, name: str) -> None:
    """``check_same_shapes`` for one tensor."""
    check_same_shapes(group=group, **{name: x})
