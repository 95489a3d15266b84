"""Replicated serving on Ray Serve: one endpoint in front of N vLLM replicas, routed by pinned adapter version.

ingress.py (FastAPI + the single server's middleware), replica.py (one AsyncLLM each, adapters multiplexed by
NAME@V), leftovers.py (what a dead replica leaves in /dev/shm), app.py (start/stop the Serve application).
"""
