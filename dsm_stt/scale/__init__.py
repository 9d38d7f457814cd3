"""Scale-out on Ray: the server's ASGI app replicated over devices and hosts by Ray Serve.

``serve.py`` owns the deployment (one replica per device, each the unchanged ``create_app``
with its own engine and slots) and ``run``, which ``dsm-stt serve --ray`` calls; ``router.py``
the request router that sends each new session to the replica with the most free slots;
``board.py`` the slot board the replicas post to, behind the cluster-wide ``/health``,
``/api/modules_info``, ``/api/cluster`` and ``/metrics``.

Nothing here touches tensors or the engine: a replica is a server app, and the server package
never imports this one. Ray is an optional dependency (``pip install "dsm-stt[ray]"``); only
importing these modules needs it.
"""
