"""The model side: loading (hub, local, embedded, tiny), the architecture adapter (the only
place that knows module paths), sites and tracing with nnsight."""
