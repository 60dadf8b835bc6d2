"""Every Group operation, checked from inside one member. Run under `mpiexec -n N`; the thread
tests call check_all on a ThreadGroup too, so both kinds pass the same checks."""

import sys

import numpy as np

from torchless.distributed import Group, MPIGroup, current_group, run_guarded


def check_all_reduce(group: Group) -> None:
    r, w = group.rank, group.world_size
    rng = np.random.default_rng(1234)  # one seed on every rank: each rank can compute the others' data
    for n in sorted({1, 2, max(w - 1, 1), w + 1, 7, 64, 576, 1001}):
        for _ in range(3):
            data = [rng.standard_normal(n).astype(np.float32) for _ in range(w)]
            want = np.sum(np.stack(data).astype(np.float64), axis=0)
            mine = data[r].copy()
            assert group.all_reduce_sum(mine) is mine
            np.testing.assert_allclose(mine, want, rtol=1e-5, atol=1e-5)
            # Ranks that disagree in the last bit would sample different tokens.
            assert group.broadcast_object(mine.tobytes(), root=0) == mine.tobytes(), f"rank {r} differs"
    matrix = np.full((3, 5), r + 1, np.float32)  # not only 1-D
    group.all_reduce_sum(matrix)
    assert (matrix == w * (w + 1) / 2).all()
    buf = np.empty(33, np.float32)
    for k in range(300):  # back to back: a stale generation or slot shows up as a wrong sum
        buf[:] = k * (r + 1)
        group.all_reduce_sum(buf)
        assert (buf == k * w * (w + 1) / 2).all(), (k, buf[:3])


def check_send_recv(group: Group) -> None:
    r, w = group.rank, group.world_size
    nxt, prev = (r + 1) % w, (r - 1) % w
    # Non-blocking sends on two tags, received tag 0 first: order holds per tag, tags don't mix.
    requests = [group.isend(np.full(4, 100 * tag + i + 10 * r, np.float32), nxt, tag=tag)
                for tag in (1, 0) for i in range(3)]
    got = np.empty(4, np.float32)
    for tag in (0, 1):
        for i in range(3):
            group.recv(got, prev, tag=tag)
            assert (got == 100 * tag + i + 10 * prev).all(), (tag, i, got)
    for request in requests:
        request.wait()
    # Blocking ping-pong between 0 and 1.
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    if r == 0:
        group.send(ids, 1, tag=7)
        back = np.empty_like(ids)
        group.recv(back, 1, tag=7)
        assert (back == ids * 2).all()
    elif r == 1:
        buf = np.empty_like(ids)
        group.recv(buf, 0, tag=7)
        group.send(buf * 2, 0, tag=7)


def check_broadcast(group: Group) -> None:
    r, w = group.rank, group.world_size
    root = w - 1
    arr = np.arange(10, dtype=np.float32) * 3 if r == root else np.zeros(10, np.float32)
    assert group.broadcast(arr, root=root) is arr
    assert (arr == np.arange(10, dtype=np.float32) * 3).all()
    msg = {"tokens": [1, 2, 3], "error": None} if r == 1 % w else None
    assert group.broadcast_object(msg, root=1 % w) == {"tokens": [1, 2, 3], "error": None}
    group.barrier()


def check_all(group: Group) -> None:
    check_all_reduce(group)
    check_send_recv(group)
    check_broadcast(group)


if __name__ == "__main__":
    group = current_group()
    assert isinstance(group, MPIGroup) and group.world_size == int(sys.argv[1]), group
    run_guarded(group, lambda: check_all(group))
    sys.stdout.write(f"ok rank {group.rank} of {group.world_size}\n")  # one write: no interleaving
    sys.stdout.flush()
