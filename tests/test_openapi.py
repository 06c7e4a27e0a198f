"""/openapi.json describes exactly the routes the daemon serves."""

from __future__ import annotations

from notifyd.app import Daemon
from tests.helpers import Api


def _served_routes(daemon: Daemon) -> set[tuple[str, str]]:
    assert daemon._runner is not None
    routes = set()
    for route in daemon._runner.app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        routes.add((route.resource.canonical, route.method.lower()))
    return routes


async def test_document_and_router_agree_route_for_route(api: Api, daemon: Daemon) -> None:
    status, document, _ = await api.get("/openapi.json", auth=False)
    assert status == 200
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == _served_routes(daemon)


async def test_every_operation_documents_its_errors_as_problems(api: Api) -> None:
    _, document, _ = await api.get("/openapi.json", auth=False)
    ids = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            ids.add(operation["operationId"])
            if operation.get("security") == []:
                continue
            assert "401" in operation["responses"], (path, method)
            problem = operation["responses"]["401"]["content"]
            assert "application/problem+json" in problem
    assert len(ids) == sum(len(ops) for ops in document["paths"].values())
