"""Small builders for etcd requests (protobuf messages), shared by the recipes."""

from __future__ import annotations

from .keys import prefix_end
from .transport import pb

CREATE = pb.Compare.CREATE
MOD = pb.Compare.MOD
EQUAL = pb.Compare.EQUAL


def cmp_create(key: bytes, rev: int) -> pb.Compare:
    return pb.Compare(key=key, target=CREATE, result=EQUAL, create_revision=rev)


def cmp_mod(key: bytes, rev: int) -> pb.Compare:
    return pb.Compare(key=key, target=MOD, result=EQUAL, mod_revision=rev)


def put(key: bytes, value: bytes, lease: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease or 0))


def delete(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))


def delete_prefix(p: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=p, range_end=prefix_end(p)))


def get(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key))


def txn(compare=(), success=(), failure=()) -> pb.TxnRequest:
    return pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))


def kvs(resp: pb.TxnResponse, i: int):
    """The key-values of the i-th (range) answer of a transaction."""
    return list(resp.responses[i].response_range.kvs)


def one(resp: pb.TxnResponse, i: int):
    k = kvs(resp, i)
    return k[0] if k else None


# ---- reads: Range requests, never read-only transactions ----
# etcd before 3.5.5 panics when a read-only transaction's request is
# cancelled or times out while the server runs it (etcd-io/etcd#14110); a
# Range in the same situation just fails.  So every read is a Range, and a
# snapshot that needs several keys is one Range over their common prefix.

def rq_get(key: bytes) -> pb.RangeRequest:
    return pb.RangeRequest(key=key)


def rq_prefix(p: bytes, keys_only: bool = False, count_only: bool = False, limit: int = 0,
              by_create: bool = False) -> pb.RangeRequest:
    r = pb.RangeRequest(key=p, range_end=prefix_end(p), keys_only=keys_only, count_only=count_only,
                        limit=limit)
    if by_create:
        r.sort_target = pb.RangeRequest.CREATE
        r.sort_order = pb.RangeRequest.ASCEND
    return r
