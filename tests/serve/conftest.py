"""The serving application on a local Ray cluster, shared by the modules that test it over HTTP.

A module that asks for ``server`` provides an ``engines`` fixture (the engine directory) and a
``SERVER`` dict (the settings beside ``engines``, as in a Serve config's ``args``)."""

from __future__ import annotations

import pytest
from serve_helpers import Client, free_port, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def server(request, engines):
    """``build_app`` over the module's engines and ``SERVER`` settings, served at "/" on a new local
    cluster for the module's tests; the cluster goes when they are done."""
    from ray import serve

    from litefocus.serve.app import build_app

    settings = request.module.SERVER
    port = free_port()
    start_cluster(port)
    try:
        serve.run(build_app({"engines": str(engines), **settings}), name="litefocus", route_prefix="/")
        yield Client(f"http://127.0.0.1:{port}")
    finally:
        stop_cluster()
