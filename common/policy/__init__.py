"""The live policy (design §6): one validated, versioned, audited document in Redis.

    store = PolicyStore(redis)
    doc = await store.put(data, actor="alice", expected_version=doc.version)
    watcher = PolicyWatcher(redis); await watcher.start(); task = create_task(watcher.run())
    watcher.current.services["nlp"].strategy          # hot path: no I/O

`model` holds the document's models and `validate_document`; `store` reads and
writes it (compare-and-set on the version, history, audit, change events), whole
(`put`) or by a JSON merge patch (`patch`, `merge`); `sections` says what a whole
write may not leave out; `watcher` keeps a process's copy current; `diff` names
what changed. The command line is
`python -m common.policy get | put FILE | patch FILE | validate FILE | history`.
"""

from common.policy.diff import changed_paths
from common.policy.model import (
    DEFAULT_POLICY,
    RESERVED_PREFIXES,
    LimitRule,
    PolicyDocument,
    PolicyInvalid,
    PolicyUnreadable,
    RetryBudgetPolicy,
    RouteRule,
    ServicePolicy,
    StrategyName,
    validate_document,
    validate_json,
)
from common.policy.store import PolicyStore
from common.policy.watcher import PolicyWatcher

__all__ = [
    "DEFAULT_POLICY",
    "RESERVED_PREFIXES",
    "LimitRule",
    "PolicyDocument",
    "PolicyInvalid",
    "PolicyStore",
    "PolicyUnreadable",
    "PolicyWatcher",
    "RetryBudgetPolicy",
    "RouteRule",
    "ServicePolicy",
    "StrategyName",
    "changed_paths",
    "validate_document",
    "validate_json",
]
