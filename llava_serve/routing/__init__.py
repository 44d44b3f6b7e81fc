"""Which model replica a request goes to: the key a prompt's prefix is known by (`key`) and the
choice among replicas by who holds the longest of it (`affinity`). No Ray here; the Serve request
router that uses these lives in `deployments/routing.py`."""
