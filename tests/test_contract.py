"""OpenAPI contract diffs (runtime/contract.py), on the schemas real FastAPI apps generate.

Each test builds a small app before and after a change, takes ``app.openapi()`` of both, and checks the
changes found: their kinds, their severity, and where they point. (No ``from __future__ import
annotations`` here: FastAPI must see the models the local endpoints are annotated with.)
"""

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query
from pydantic import BaseModel, ConfigDict

from runtime.contract import Change, diff_schemas, format_changes, summarize


def _openapi(build: Callable[[FastAPI], None]) -> dict[str, Any]:
    app = FastAPI()
    build(app)
    return app.openapi()


def _kinds(changes: list[Change]) -> dict[tuple[str, str, str | None], str]:
    """(kind, path, method) -> severity; fails on two changes with the same key but different severity."""
    found: dict[tuple[str, str, str | None], str] = {}
    for change in changes:
        key = (change.kind, change.path, change.method)
        assert found.setdefault(key, change.severity) == change.severity
    return found


class Item(BaseModel):
    name: str
    price: float
    description: str = ""


def _items_app(
    model: type[BaseModel] = Item, *, extra: Callable[[FastAPI], None] | None = None
) -> dict[str, Any]:
    def build(app: FastAPI) -> None:
        @app.get("/items/{item_id}", response_model=model)
        def read_item(item_id: int, q: str | None = None) -> Any: ...

        @app.post("/items", response_model=model)
        def create_item(item: model) -> Any: ...

        @app.get("/health")
        def health() -> dict[str, str]: ...

        if extra is not None:
            extra(app)

    return _openapi(build)


def test_identical_schemas_have_no_changes() -> None:
    assert diff_schemas(_items_app(), _items_app()) == []
    assert summarize([]) == {
        "total": 0,
        "breaking": 0,
        "non_breaking": 0,
        "has_breaking": False,
        "by_kind": {},
        "operations": [],
    }
    assert format_changes([]) == ["API contract: no changes."]


def test_removed_route_is_breaking() -> None:
    old = _items_app(extra=lambda app: app.delete("/items/{item_id}")(lambda item_id: None))
    new = _items_app()

    changes = diff_schemas(old, new)

    assert _kinds(changes) == {("method_removed", "/items/{item_id}", "DELETE"): "breaking"}
    assert changes[0].location == "#/paths/~1items~1{item_id}/delete"
    assert changes[0].message == "DELETE /items/{item_id}: operation removed"
    whole = diff_schemas(old, _openapi(lambda app: None))
    assert {(c.kind, c.path) for c in whole} == {
        ("path_removed", "/items/{item_id}"),
        ("path_removed", "/items"),
    } | {("path_removed", "/health")}
    assert all(c.severity == "breaking" and c.method is None for c in whole)


def test_added_route_is_not_breaking() -> None:
    changes = diff_schemas(_items_app(), _items_app(extra=lambda app: app.get("/new")(lambda: None)))

    assert _kinds(changes) == {("path_added", "/new", None): "non_breaking"}


def test_new_required_query_parameter_is_breaking() -> None:
    def old(app: FastAPI) -> None:
        @app.get("/search")
        def search(q: str) -> list[str]: ...

    def new(app: FastAPI) -> None:
        @app.get("/search")
        def search(q: str, page: int, size: int = 10) -> list[str]: ...

    changes = diff_schemas(_openapi(old), _openapi(new))

    assert _kinds(changes) == {
        ("parameter_added_required", "/search", "GET"): "breaking",
        ("parameter_added", "/search", "GET"): "non_breaking",
    }
    required = next(c for c in changes if c.kind == "parameter_added_required")
    assert required.location == "#/paths/~1search/get/parameters/query/page"
    assert required.message == "GET /search: required query parameter `page` added"


def test_parameter_made_required_and_header_parameters() -> None:
    def old(app: FastAPI) -> None:
        @app.get("/search")
        def search(q: str | None = None, x_token: Annotated[str | None, Header()] = None) -> None: ...

    def new(app: FastAPI) -> None:
        @app.get("/search")
        def search(q: Annotated[str, Query()], x_token: Annotated[str, Header()]) -> None: ...

    kinds = _kinds(diff_schemas(_openapi(old), _openapi(new)))

    assert kinds == {
        ("parameter_made_required", "/search", "GET"): "breaking",
        ("parameter_type_narrowed", "/search", "GET"): "breaking",  # null no longer accepted
    }
    back = _kinds(diff_schemas(_openapi(new), _openapi(old)))
    assert set(back.values()) == {"non_breaking"}


def test_changed_field_type_is_breaking_in_both_directions() -> None:
    class Renamed(BaseModel):
        name: str
        price: str
        description: str = ""

    changes = diff_schemas(_items_app(), _items_app(Renamed))

    assert _kinds(changes) == {
        ("request_type_narrowed", "/items", "POST"): "breaking",
        ("response_type_changed", "/items", "POST"): "breaking",
        ("response_type_changed", "/items/{item_id}", "GET"): "breaking",
    }
    request = next(c for c in changes if c.kind == "request_type_narrowed")
    assert request.message == "POST /items: request field `price` narrowed from number to string"
    assert request.location.endswith("/requestBody/content/application~1json/schema/properties/price")


def test_number_to_integer_narrows_requests_only() -> None:
    class Whole(BaseModel):
        name: str
        price: int
        description: str = ""

    changes = diff_schemas(_items_app(), _items_app(Whole))

    assert _kinds(changes) == {
        ("request_type_narrowed", "/items", "POST"): "breaking",
        ("response_type_narrowed", "/items", "POST"): "non_breaking",
        ("response_type_narrowed", "/items/{item_id}", "GET"): "non_breaking",
    }
    widened = _kinds(diff_schemas(_items_app(Whole), _items_app()))
    assert widened == {
        ("request_type_widened", "/items", "POST"): "non_breaking",
        ("response_type_changed", "/items", "POST"): "breaking",
        ("response_type_changed", "/items/{item_id}", "GET"): "breaking",
    }


def test_removed_response_field_is_breaking() -> None:
    class Smaller(BaseModel):
        name: str
        price: float

    changes = diff_schemas(_items_app(), _items_app(Smaller))

    assert _kinds(changes) == {
        ("response_field_removed", "/items", "POST"): "breaking",
        ("response_field_removed", "/items/{item_id}", "GET"): "breaking",
        ("request_field_removed", "/items", "POST"): "non_breaking",  # an extra field sent is ignored
    }
    assert {c.location.rsplit("/", 1)[1] for c in changes} == {"description"}


def test_removed_request_field_breaks_when_extra_fields_are_forbidden() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        price: float
        description: str = ""

    class StrictSmaller(BaseModel):
        model_config = ConfigDict(extra="forbid")
        name: str
        price: float

    kinds = _kinds(diff_schemas(_items_app(Strict), _items_app(StrictSmaller)))

    assert kinds[("request_field_removed", "/items", "POST")] == "breaking"


def test_field_made_optional_breaks_responses_not_requests() -> None:
    class Optional(BaseModel):
        name: str | None = None
        price: float
        description: str = ""

    changes = diff_schemas(_items_app(), _items_app(Optional))

    assert _kinds(changes) == {
        ("response_field_made_optional", "/items", "POST"): "breaking",
        ("response_field_made_nullable", "/items", "POST"): "breaking",
        ("response_field_made_optional", "/items/{item_id}", "GET"): "breaking",
        ("response_field_made_nullable", "/items/{item_id}", "GET"): "breaking",
        ("request_field_made_optional", "/items", "POST"): "non_breaking",
        ("request_type_widened", "/items", "POST"): "non_breaking",
    }
    assert "GET /items/{item_id}: response field `name` may now be null" in [c.message for c in changes]


def test_added_optional_field_is_non_breaking_only() -> None:
    class Bigger(BaseModel):
        name: str
        price: float
        description: str = ""
        tags: list[str] = []
        note: str | None = None

    changes = diff_schemas(_items_app(), _items_app(Bigger))

    assert changes and all(c.severity == "non_breaking" for c in changes)
    assert {c.kind for c in changes} == {"request_field_added", "response_field_added"}
    assert summarize(changes)["has_breaking"] is False


def test_added_required_request_field_is_breaking() -> None:
    class WithSku(BaseModel):
        name: str
        price: float
        description: str = ""
        sku: str

    kinds = _kinds(diff_schemas(_items_app(), _items_app(WithSku)))

    assert kinds == {
        ("request_field_added_required", "/items", "POST"): "breaking",
        ("response_field_added", "/items", "POST"): "non_breaking",
        ("response_field_added", "/items/{item_id}", "GET"): "non_breaking",
    }


def test_enum_values() -> None:
    class Size(StrEnum):
        small = "small"
        large = "large"

    class Fewer(StrEnum):
        small = "small"

    class Shirt(BaseModel):
        size: Size

    class NarrowShirt(BaseModel):
        size: Fewer

    def app_for(model: type[BaseModel]) -> dict[str, Any]:
        def build(app: FastAPI) -> None:
            @app.put("/shirts", response_model=model)
            def put_shirt(shirt: model) -> Any: ...

        return _openapi(build)

    removed = _kinds(diff_schemas(app_for(Shirt), app_for(NarrowShirt)))
    added = _kinds(diff_schemas(app_for(NarrowShirt), app_for(Shirt)))

    assert removed == {
        ("request_enum_value_removed", "/shirts", "PUT"): "breaking",
        ("response_enum_value_removed", "/shirts", "PUT"): "non_breaking",
    }
    assert added == {
        ("request_enum_value_added", "/shirts", "PUT"): "non_breaking",
        ("response_enum_value_added", "/shirts", "PUT"): "breaking",
    }


def test_removed_success_status_is_breaking_error_statuses_are_not() -> None:
    def old(app: FastAPI) -> None:
        @app.post("/jobs")
        def create_job(name: str) -> dict[str, str]: ...

    def new(app: FastAPI) -> None:
        @app.post("/jobs", status_code=202)
        def create_job() -> dict[str, str]: ...

    changes = diff_schemas(_openapi(old), _openapi(new))

    assert sorted((c.kind, c.location.rsplit("/", 1)[1], c.severity) for c in changes) == [
        ("parameter_removed", "name", "non_breaking"),
        ("response_status_added", "202", "non_breaking"),
        ("response_status_removed", "200", "breaking"),
        ("response_status_removed", "422", "non_breaking"),  # no parameters left to validate
    ]


def test_new_required_request_body_is_breaking() -> None:
    def old(app: FastAPI) -> None:
        @app.post("/items")
        def create() -> None: ...

    def new(app: FastAPI) -> None:
        @app.post("/items")
        def create(item: Item) -> None: ...

    kinds = _kinds(diff_schemas(_openapi(old), _openapi(new)))

    assert kinds[("request_body_added_required", "/items", "POST")] == "breaking"


def test_renamed_path_parameter_is_the_same_path() -> None:
    def renamed(app: FastAPI) -> None:
        @app.get("/items/{id}")
        def read(id: int, q: str | None = None) -> Item: ...

    def old(app: FastAPI) -> None:
        @app.get("/items/{item_id}")
        def read(item_id: int, q: str | None = None) -> Item: ...

    assert diff_schemas(_openapi(old), _openapi(renamed)) == []


class Tree(BaseModel):
    name: str
    children: list["Tree"] = []


class Tree2(BaseModel):
    name: str
    size: int
    children: list["Tree2"] = []


def test_recursive_models_terminate() -> None:
    def app_for(model: type[BaseModel]) -> dict[str, Any]:
        def build(app: FastAPI) -> None:
            @app.post("/trees", response_model=model)
            def plant(tree: model) -> Any: ...

        return _openapi(build)

    assert diff_schemas(app_for(Tree), app_for(Tree)) == []
    changes = diff_schemas(app_for(Tree), app_for(Tree2))
    assert _kinds(changes) == {
        ("request_field_added_required", "/trees", "POST"): "breaking",
        ("response_field_added", "/trees", "POST"): "non_breaking",
    }


def test_handwritten_openapi_30_and_31_forms() -> None:
    def doc(schema: dict[str, Any], components: dict[str, Any] | None = None) -> dict[str, Any]:
        content = {"application/json": {"schema": schema}}
        operation = {"requestBody": {"content": content}, "responses": {"200": {"content": content}}}
        return {
            "openapi": "3.1.0",
            "paths": {"/x": {"post": operation}},
            "components": {"schemas": components or {}},
        }

    nullable_30 = doc({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}})
    nullable_31 = doc({"type": "object", "properties": {"a": {"type": ["string", "null"]}}})
    one_of = doc({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "null"}]}}})
    plain = doc({"type": "object", "properties": {"a": {"type": "string"}}})
    all_of = doc(
        {"allOf": [{"$ref": "#/components/schemas/Base"}, {"properties": {"b": {"type": "integer"}}}]},
        {"Base": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}},
    )
    all_of_more = doc(
        {"allOf": [{"$ref": "#/components/schemas/Base"}, {"properties": {"b": {"type": "integer"}}}]},
        {
            "Base": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "c": {}},
                "required": ["a", "c"],
            }
        },
    )

    assert diff_schemas(nullable_30, nullable_31) == [] and diff_schemas(nullable_31, one_of) == []
    assert _kinds(diff_schemas(plain, nullable_30)) == {
        ("request_type_widened", "/x", "POST"): "non_breaking",
        ("response_field_made_nullable", "/x", "POST"): "breaking",
    }
    assert _kinds(diff_schemas(all_of, all_of_more)) == {
        ("request_field_added_required", "/x", "POST"): "breaking",
        ("response_field_added", "/x", "POST"): "non_breaking",
    }


def test_odd_documents_do_not_raise() -> None:
    odd: list[dict[str, Any]] = [
        {},
        {"paths": None},
        {"paths": {"/a": None, "/b": {"get": "nope", "post": {"parameters": [None, {"$ref": "#/nowhere"}]}}}},
        {"paths": {"/b": {"post": {"requestBody": {"content": {"x/y": {"schema": {"$ref": "#/loop"}}}}}}}},
        {"loop": {"$ref": "#/loop"}, "paths": {"/b": {"post": {"responses": {"200": {"$ref": "#/loop"}}}}}},
    ]
    for old in odd:
        for new in odd:
            diff_schemas(old, new)


def test_summary_and_text() -> None:
    class Smaller(BaseModel):
        name: str
        price: float

    changes = diff_schemas(_items_app(), _items_app(Smaller))
    summary = summarize(changes)

    assert summary == {
        "total": 3,
        "breaking": 2,
        "non_breaking": 1,
        "has_breaking": True,
        "by_kind": {"request_field_removed": 1, "response_field_removed": 2},
        "operations": ["GET /items/{item_id}", "POST /items"],
    }
    assert format_changes(changes) == [
        "API contract: 2 breaking, 1 non-breaking change(s).",
        "  BREAKING POST /items: response field `description` removed",
        "  BREAKING GET /items/{item_id}: response field `description` removed",
        "  ok       POST /items: request field `description` removed",
    ]
    assert json.loads(json.dumps([c.as_dict() for c in changes]))[0] == {
        "kind": "response_field_removed",
        "severity": "breaking",
        "path": "/items",
        "method": "POST",
        "location": "#/paths/~1items/post/responses/200/content/application~1json/schema"
        "/properties/description",
        "message": "POST /items: response field `description` removed",
    }
