"""How work and results are split over ranks: one place for the process group, rank-0-only
work, metric reduction and the fixed parts that make 1 and N processes compute the same thing.

`python train.py` is a world of one on the same code path as `torchrun --nproc_per_node=N`.
"""
import atexit
import hashlib
import json
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def setup():
    """Start the process group (a one-process group outside torchrun) -> (rank, world, device)."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # Metrics are reduced as small CPU tensors, so a GPU run needs gloo beside nccl.
    init_group("cpu:gloo,cuda:nccl" if cuda else "gloo", device_id=device if cuda else None)
    if not cuda:  # the cores shared by the ranks of this machine, or SPIN_THREADS per rank
        torch.set_num_threads(int(os.environ.get("SPIN_THREADS") or max(1, (os.cpu_count() or 1) // world)))
    return rank, world, device


_group = {}  # the rendezvous store of the process group: how a failing rank tells the others


def init_group(backend, device_id=None):
    """dist.init_process_group from the torchrun environment, keeping its key-value store, which
    stays reachable when a rank has died (torchrun's agent holds it): first_report and
    peer_failed use it so that a failure is reported once, by the rank that saw it."""
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store, _, _ = next(dist.rendezvous("env://", r, w))
    _group["store"] = store
    if w > 1:  # who each rank is, so that the others can tell when it died without a word (dead_peers)
        store.set(f"spin/pid/{r}", json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        atexit.register(mark_exit)
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=r, world_size=w,
                            device_id=device_id)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def log(*a):
    if rank() == 0:
        print(*a, flush=True)


class PeerFailed(Exception):
    """Raised on the other ranks when rank 0's own work failed: rank 0 reports the error, these
    ranks stop without repeating it (errors.run_command)."""


def on_rank0(fn):
    """Run fn on rank 0 only; returns its result there (None on the other ranks). Every rank
    learns whether it failed, so none waits forever at the next collective (a full disk during
    an export, say)."""
    err, exc, result = [None], None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:
            exc, err[0] = e, f"{type(e).__name__}: {e}"
    if world() > 1:
        dist.broadcast_object_list(err, src=0)
    if exc is not None:
        raise exc
    if err[0]:
        raise PeerFailed(f"rank 0 failed: {err[0]}")
    return result


def from_rank0(obj):
    """rank 0's `obj` on every rank (a small picklable value)."""
    box = [obj]
    if world() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def first_report(message):
    """Called by a failing rank: marks the failure for peer_failed, and returns True when no rank
    has reported this message yet (the caller prints it then). message None only marks. Outside
    a process group of several ranks, always True."""
    store = _group.get("store")
    if store is None or world() == 1:
        return True
    try:
        store.set("spin/failed", str(rank()))
        if message is None:
            return True
        return store.add("spin/reported/" + hashlib.sha256(message.encode()).hexdigest()[:16], 1) == 1
    except Exception:  # the store is gone with its host: better twice than never
        return True


def peer_failed():
    """True when another rank has already failed (first_report), so an error here, such as a
    collective whose peer closed its connection, is a consequence, not news."""
    store = _group.get("store")
    if store is None or world() == 1:
        return False
    try:
        return store.check(["spin/failed"])
    except Exception:  # the store's host (rank 0, or torchrun's agent) is gone
        return True


def mark_exit():
    """This rank ends on its own terms (an error it reports, SIGTERM, the end of the run): a peer
    that finds it gone then knows it did not die (dead_peers)."""
    store = _group.get("store")
    if store is None or _group.get("exited"):
        return
    _group["exited"] = True
    try:
        store.set_timeout(timedelta(seconds=5))  # on the way out: never wait long for a store that is gone
        store.set(f"spin/exit/{rank()}", "1")
    except Exception:
        pass


def _gone(pid):
    """True when no process `pid` runs on this machine (or only its zombie, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def dead_peers(wait=0.0):
    """The other ranks of this machine that died without a word (SIGKILL, the out-of-memory killer,
    a crash in C code): their process is gone and they never marked an exit. ["rank 1 (pid 123)"];
    [] when none, or when it cannot be told (one process, no store). Ranks on other machines are
    not seen. wait: seconds to keep looking, for a collective that broke as a peer's sockets were
    closed, which the kernel does before the process is gone."""
    store, host = _group.get("store"), socket.gethostname()
    if store is None or world() == 1:
        return []
    deadline = time.time() + wait
    try:
        store.set_timeout(timedelta(seconds=5))  # called on the way out
        peers = {r: json.loads(store.get(f"spin/pid/{r}")) for r in range(world())
                 if r != rank() and store.check([f"spin/pid/{r}"])}
        while True:
            dead = [f"rank {r} (pid {who['pid']})" for r, who in peers.items()
                    if who["host"] == host and _gone(who["pid"]) and not store.check([f"spin/exit/{r}"])]
            if dead or time.time() >= deadline:
                return dead
            time.sleep(0.1)
    except Exception:  # the store's host is gone too: nothing can be told
        return []


def reduce_sums(sums, op="sum"):
    """{name: float} summed (or maxed) over ranks, in float64 and in a fixed key order, so every
    rank gets the same numbers, whatever the world size."""
    names = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in names], dtype=torch.float64)
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(names, t.tolist()))


def parts_of(n, rank, world, size=256):
    """The index ranges this rank takes: part p is [p*size, (p+1)*size), done by rank p % world.
    Each part goes through score/sample in one call whatever the world size, so its batches,
    and therefore its float rounding, are the same with 1 or N ranks."""
    return [range(p, min(n, p + size)) for p in range(rank * size, n, world * size)]


def clip_grad_norm(params, max_norm):
    """Scale the gradients so their global L2 norm is at most max_norm; returns the norm before.
    Why not torch.nn.utils.clip_grad_norm_: its norm of sharded gradients sums in an order that
    depends on the number of ranks, and one ulp of difference in the scale factor, amplified by
    hundreds of steps, made 1 and 2 processes end in different models. Squares summed in float64
    and rounded once to float32 give the same factor for any sharding."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params if p.grad is not None]
    sq = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else "cpu")
    for g in grads:
        sq += g.double().pow(2).sum()
    if world() > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt().float()  # (1,)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm[0]
