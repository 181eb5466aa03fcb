"""Deployment: many replicas of an engine behind one endpoint (routing, embedded multi-replica serving, Ray Serve)."""
