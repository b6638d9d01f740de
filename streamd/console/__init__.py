"""``streamd console``: a web console for a running daemon (docs/console.md).

A process of its own that reaches the daemon only through its public interfaces: the events
socket (SUB), the control socket (REQ, as ``streamd speakers`` does) and /metrics. The daemon
never waits for it: a console that is down, slow or flooded changes nothing there.
"""
