"""Property tests of the header handling: what goes upstream (`request_headers`, `merge_beta`) and how the
user token is read from `Authorization` / `x-api-key` (`presented_token`, `Authenticator`).

The config loader and the SSE tap have their own property tests (tests/test_config.py, tests/test_sse_tap.py).
"""

from __future__ import annotations

import hashlib
import http.client
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccm_wsgi.config import User
from ccm_wsgi.errors import ProxyError
from ccm_wsgi.http.auth import Authenticator, presented_token
from ccm_wsgi.upstream.request import OAUTH_BETA, merge_beta, request_headers
from tests.support.constants import ALICE, BOB

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^`|~"  # RFC 9110 token characters, "_" aside
NAMES = st.one_of(
    st.sampled_from(["connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host",
                     "proxy-authorization", "content-length", "expect", "authorization", "x-api-key", "api-key",
                     "anthropic-beta", "anthropic-version", "x-stainless-lang", "user-agent", "x-custom"]),
    st.text(TCHAR, min_size=1, max_size=20),
)
# latin-1, as a WSGI server hands header values over, with line breaks (obs-fold) and control characters
VALUES = st.text(st.characters(min_codepoint=0, max_codepoint=255, blacklist_categories=("Cs",)), max_size=60)
BETA_ITEMS = st.lists(st.text(st.sampled_from("abc-_ ,\t0123456789"), max_size=12), max_size=6)


# The oracle, written out here on purpose (not imported from the code under test): hop-by-hop headers (RFC 9110
# section 7.6.1, plus the proxy-* ones and "trailers"), Host, the framing the HTTP client recomputes, and the
# client's own credentials for ccm-wsgi (Authorization, x-api-key, api-key) never go upstream.
NEVER_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect", "authorization", "x-api-key",
    "api-key",
})


def environ_key(name: str) -> str:
    return "HTTP_" + name.upper().replace("-", "_")


@st.composite
def environs(draw: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/messages", "wsgi.input": object()}
    for name, value in draw(st.dictionaries(NAMES, VALUES, max_size=12)).items():
        environ[environ_key(name)] = value
    if draw(st.booleans()):
        listed = draw(st.lists(NAMES, max_size=3))
        environ["HTTP_CONNECTION"] = ", ".join([*listed, draw(VALUES)])
    if draw(st.booleans()):
        environ["CONTENT_TYPE"] = draw(VALUES)
    return environ


CONFIGURED = st.dictionaries(st.sampled_from(["X-Team", "User-Agent", "anthropic-version", "X-Trace"]),
                             st.lists(st.text(string.ascii_letters + " -/.", min_size=1, max_size=10), min_size=1,
                                      max_size=3).map(tuple), max_size=3)


def beta_items(value: str | None) -> list[str]:
    return [i.strip() for i in (value or "").split(",") if i.strip()]


@SETTINGS
@given(environ=environs(), configured=CONFIGURED)
def test_request_headers_are_safe_to_send(environ: dict[str, Any], configured: dict[str, tuple[str, ...]]) -> None:
    headers = request_headers(environ, configured)
    listed = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    own = {n.lower() for n in configured} | {"anthropic-beta"}
    if environ.get("CONTENT_TYPE"):
        own.add("content-type")
    sent = {key[5:].replace("_", "-").lower() for key in environ if key.startswith("HTTP_")}
    # every end-to-end header the client sent goes upstream, with ours, and nothing else
    expected = (sent - NEVER_FORWARDED - listed) | own
    assert set(headers) == expected, sorted(set(headers) ^ expected)
    conn = http.client.HTTPConnection("127.0.0.1", 9)  # never connects: putheader only validates and buffers
    conn.putrequest("POST", "/v1/messages", skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        assert name == name.lower()
        assert name not in NEVER_FORWARDED or name in own, name  # hop-by-hop, Host, framing, credentials
        assert name in own or name not in listed
        assert "\r" not in value and "\n" not in value, (name, value)  # no header splitting upstream
        conn.putheader(name, value.encode("latin-1"))  # raises on anything http.client would refuse
    for name, values in configured.items():
        assert headers[name.lower()] == ", ".join(values)
    items = headers["anthropic-beta"].split(",")
    assert items[0] == OAUTH_BETA and len(items) == len(set(items))
    if "anthropic-beta" not in {n.lower() for n in configured}:
        client = environ.get("HTTP_ANTHROPIC_BETA")
        client_items = beta_items(client.replace("\r", " ").replace("\n", " ") if client else None)
        assert set(items) == {OAUTH_BETA, *client_items} or "anthropic-beta" in listed
    if environ.get("CONTENT_TYPE"):
        assert headers["content-type"].split() == environ["CONTENT_TYPE"].split()


@SETTINGS
@given(values=st.lists(st.one_of(st.none(), st.builds(",".join, BETA_ITEMS)), max_size=4))
def test_merge_beta(values: list[str | None]) -> None:
    merged = merge_beta(*values)
    items = merged.split(",")
    assert items[0] == OAUTH_BETA
    assert len(items) == len(set(items)) and all(i and i == i.strip() for i in items)
    expected: list[str] = [OAUTH_BETA]
    for value in values:
        for item in beta_items(value):
            if item not in expected:
                expected.append(item)
    assert items == expected  # first occurrence order, nothing invented
    assert merge_beta(merged) == merged and merge_beta(merged, *values) == merged


TOKENS = st.text(string.ascii_letters + string.digits + "-_.~+/=", min_size=1, max_size=60)
SPACES = st.text(" ", min_size=1, max_size=4)
BEARER = st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"])


@SETTINGS
@given(scheme=BEARER, sep=SPACES, token=TOKENS, pad=st.text(" \t", max_size=3), api_key=st.none() | TOKENS)
def test_bearer_token_is_read_whatever_the_case_and_spacing(scheme: str, sep: str, token: str, pad: str,
                                                            api_key: str | None) -> None:
    environ = {"HTTP_AUTHORIZATION": pad + scheme + sep + token + pad}
    if api_key is not None:
        environ["HTTP_X_API_KEY"] = api_key  # Authorization wins
    assert presented_token(environ) == token


@SETTINGS
@given(authorization=st.none() | VALUES, api_key=st.none() | VALUES)
def test_presented_token_never_raises(authorization: str | None, api_key: str | None) -> None:
    environ = {}
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    if api_key is not None:
        environ["HTTP_X_API_KEY"] = api_key
    token = presented_token(environ)
    if authorization:
        scheme = authorization.strip().partition(" ")[0]
        assert token == "" or (scheme.lower() == "bearer" and token == token.strip() and token)
    elif api_key is not None:
        assert token == api_key.strip()
    else:
        assert token is None


HASHED = "ak-ccm-carol-hashed-0123456789"
FIXED_401 = {b'{"type":"error","error":{"type":"authentication_error","message":"invalid ccm user token"}}',
             b'{"type":"error","error":{"type":"authentication_error","message":'
             b'"missing ccm user token (set ANTHROPIC_AUTH_TOKEN)"}}'}
AUTH = Authenticator([User(name="alice", token=ALICE), User(name="bob", token=BOB),
                      User(name="carol", token_sha256=hashlib.sha256(HASHED.encode()).hexdigest())])


@SETTINGS
@given(guess=st.one_of(VALUES, st.builds(lambda n, s: ALICE[:n] + s, st.integers(0, len(ALICE)), TOKENS)),
       header=st.sampled_from(["HTTP_AUTHORIZATION", "HTTP_X_API_KEY"]))
def test_any_wrong_token_is_a_401_that_does_not_repeat_it(guess: str, header: str) -> None:
    value = "Bearer " + guess if header == "HTTP_AUTHORIZATION" else guess
    if guess.strip() in (ALICE, BOB, HASHED):
        return
    with pytest.raises(ProxyError) as err:
        AUTH.authenticate({header: value})
    assert err.value.status == 401 and err.value.kind == "authentication_error"
    assert err.value.body() in FIXED_401  # the same words for every token: nothing of it repeated
    assert not AUTH.is_admin({header: value})


@pytest.mark.parametrize(("token", "name"), [(ALICE, "alice"), (BOB, "bob"), (HASHED, "carol")])
@SETTINGS
@given(pad=st.text(" ", max_size=3), header=st.sampled_from(["HTTP_AUTHORIZATION", "HTTP_X_API_KEY"]))
def test_right_tokens_authenticate_in_either_header(token: str, name: str, pad: str, header: str) -> None:
    value = "Bearer " + pad + token + pad if header == "HTTP_AUTHORIZATION" else pad + token + pad
    assert AUTH.authenticate({header: value}).name == name
