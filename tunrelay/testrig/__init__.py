"""A test rig, not for production: hosts on one machine.

It builds network namespaces and a veth pair between them (``netns``), or a
star of them, a hub and its spokes (``hub``), runs a relay in each of a
pair through the CLI (``pair``), runs a relay against a foreign peer that
leaves Nagle on (``nagle``, with the small len16 peer ``nagle_peer``), and
drives ``tunrelay demo`` (``demo``).  It needs root, creates and deletes namespaces, interfaces and
processes, and serves the demo, the integration tests and the benchmarks
only: nothing in the core or the daemon's relay depends on it.
"""
