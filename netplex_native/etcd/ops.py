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


def first(p: bytes, before: int = 0, count_only: bool = False) -> pb.RequestOp:
    """The key of lowest create revision under prefix *p* (or, with
    *before*, the highest one created before revision *before*)."""
    r = pb.RangeRequest(key=p, range_end=prefix_end(p), sort_target=pb.RangeRequest.CREATE,
                        sort_order=pb.RangeRequest.ASCEND, limit=1)
    if before:
        r.max_create_revision = before - 1
        r.sort_order = pb.RangeRequest.DESCEND
    if count_only:
        r.count_only = True
        r.limit = 0
    return pb.RequestOp(request_range=r)


def all_under(p: bytes, keys_only: bool = False) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=p, range_end=prefix_end(p), keys_only=keys_only))


def txn(compare=(), success=(), failure=()) -> pb.TxnRequest:
    return pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))


def kvs(resp: pb.TxnResponse, i: int):
    """The key-values of the i-th (range) answer of a transaction."""
    return list(resp.responses[i].response_range.kvs)


def one(resp: pb.TxnResponse, i: int):
    k = kvs(resp, i)
    return k[0] if k else None
