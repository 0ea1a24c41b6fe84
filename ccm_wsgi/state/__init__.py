"""Shared state of several ccm-wsgi nodes, on Redis (`state` of a service).

One concern per module, all through one `SharedState` connection (connection.py):

* credentials.py: each credential's current login, refreshed by one node at a time under a Redis lock;
* usage.py: every node's usage records in one stream, exactly once, and the ledger every node derives from it;
* counters.py: requests in flight (leases that expire) and requests per minute, cluster-wide;
* pool.py: what any node learns about a credential's quota, seen by all.

Redis being unreachable never fails a request that would otherwise succeed: every concern falls back to
what the node has locally, says so (log, `/ccm/v1/status`, `SharedState.healthy` and its counters), and
catches up when Redis is back.
"""
