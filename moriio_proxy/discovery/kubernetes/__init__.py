"""Kubernetes discovery: each proxy replica watches the labelled P and D pods itself.

``pods``: which pod stands for which instance (pure rules, no I/O). ``api``: credentials
and the typed pod list and watch; the only module that imports the optional
kubernetes-asyncio (``pip install 'moriio-proxy[k8s]'``). ``reflector``: one role's
list/watch loop, re-listing after 410 Gone or a dropped watch. ``source``:
``KubernetesDiscovery``, which reconciles what the reflectors report into the registry.

Nothing is imported here, so the pod rules stay importable without the extra; import
``KubernetesDiscovery`` from ``.source``.
"""
