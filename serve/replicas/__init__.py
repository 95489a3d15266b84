"""Replicated serving on Ray Serve: one endpoint in front of N vLLM replicas, routed by pinned adapter version.

ingress.py (FastAPI + the single server's middleware), replica.py (one AsyncLLM each, adapters multiplexed by
NAME@V), sticky_router.py (Serve request router: a home replica per NAME@V), leftovers.py (what a dead replica
leaves in /dev/shm), app.py (size the replicas, start/stop the Serve application).
"""
