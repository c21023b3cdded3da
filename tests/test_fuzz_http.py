"""The HTTP API against its own OpenAPI document: schemathesis generates requests for every operation
the document lists (valid ones, and ones that break the schema on purpose) and checks each answer:
no 5xx, a status the document lists, the documented content type, headers and body schema, invalid
input refused, and authentication enforced where the document says it is.

The document is fetched from the running server (``/openapi.json``), as a client would, and the
operations are enumerated from ``frontends/openapi.py`` at collection, so each has a test of its
own; the first test checks that the two lists are the same.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from frontends.openapi import document
from tests.conftest import Cluster

pytestmark = pytest.mark.timeout(180)

TOKEN = "fuzz-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 25  # per operation and mode: the whole file stays well under a minute on two shared cores

# Where the catalog has a say, a request the schema allows may still be refused: a model that is not in
# the catalog, a size beyond the model's, a kind it does not do. No schema can say all that (the catalog
# is the server's), so there the built-in "valid data is accepted" check gives way to a stricter one of
# ours: such a refusal is a 400 or 422 that names the field.
CATALOG_DECIDES = {("/v1/jobs", "POST"), ("/v1/images/generations", "POST"), ("/sdapi/v1/txt2img", "POST"),
                   ("/sdapi/v1/img2img", "POST"), ("/v1/trainings", "POST")}

# Every operation is fuzzed, the event stream too: a generated job id names no job, so it answers at
# once (404) instead of streaming. A live stream of a real job is tests/test_http.py's.
OPERATIONS = sorted((path, method.upper()) for path, methods in document("")["paths"].items() for method in methods)


def refusals_name_the_field(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                            case: schemathesis.Case) -> None:
    """A schema-valid request refused for what the catalog says is refused with a 400 or 422 that
    says which field to change; anything else but auth, not found, a cancel or a rate limit is a bug."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code < 400:
        return
    assert response.status_code in (400, 401, 403, 404, 409, 422, 429), f"{response.status_code}: {response.text}"
    if response.status_code in (400, 422):
        body = response.json()
        error = body.get("error") or {}
        named = body.get("detail") if case.operation.path.startswith("/sdapi/") else error.get("field") or \
            error.get("param")  # A1111 has only a text; the native and OpenAI errors have a field
        assert named, f"a refusal that names no field: {response.text}"


@pytest.fixture(scope="module")
def api(atelier_home, tmp_path_factory):
    """An atelier with a token, a rate limit no fuzzer reaches, and the noop model as the default,
    so the synchronous OpenAI and A1111 calls the fuzzer makes finish in milliseconds."""
    config = tmp_path_factory.mktemp("fuzz-http") / "atelier.toml"
    config.write_text(f"""
default_model = "noop"

[http]
rate_per_minute = 100000

[[http.tokens]]
token = "{TOKEN}"
user = "fuzz"
""")
    cluster = Cluster(atelier_home, config).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def schema(api):
    # No made-up query parameters in the negative cases: OpenAPI cannot say a query string is closed,
    # and the server ignores parameters it does not know, as A1111 and most HTTP APIs do.
    config = schemathesis.Config.from_dict({"generation": {"allow-extra-parameters": False}})
    return schemathesis.openapi.from_url(f"{api.http}/openapi.json", config=config, timeout=30)


def test_the_served_document_lists_every_operation(schema):
    served = sorted((result.ok().path, result.ok().method.upper()) for result in schema.get_all_operations())
    assert served == OPERATIONS


@pytest.mark.parametrize("path, method", OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_the_operation_keeps_to_the_document(schema, api, path, method):
    operation = schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))
    decided = (path, method) in CATALOG_DECIDES
    excluded = [positive_data_acceptance] if decided else []
    additional = [refusals_name_the_field] if decided else []

    @settings(derandomize=True, database=None, deadline=None, max_examples=2 * EXAMPLES,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def check(case):
        case.call_and_validate(session=session, headers=AUTH, timeout=60, excluded_checks=excluded,
                               additional_checks=additional)

    with requests.Session() as session:
        check()


def test_a_method_the_document_does_not_list_is_405_with_allow(schema, api):
    # What schemathesis' unsupported-method check asks, for every path, without its coverage phase.
    methods = {"GET", "POST", "PUT", "PATCH", "DELETE"}
    documented: dict[str, set[str]] = {}
    for path, method in OPERATIONS:
        documented.setdefault(path, set()).add(method)
    wrong = []
    with requests.Session() as session:
        for path, allowed in documented.items():
            url = api.http + path.replace("{job_id}", "j1").replace("{name}", "j1-0.png").replace(
                "{lease_id}", "l1").replace("{node}", "n1")
            for method in sorted(methods - allowed):
                response = session.request(method, url, headers=AUTH, timeout=30)
                allow = {m.strip() for m in response.headers.get("Allow", "").split(",") if m.strip()}
                if response.status_code != 405 or not allowed <= allow:
                    wrong.append((method, path, response.status_code, sorted(allow)))
    assert not wrong
