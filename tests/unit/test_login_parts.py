"""The login's pure parts: PKCE, the authorize URL Claude Code prints, what a person may paste, and the validity
of a certificate read from its DER (doctor)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib

import pytest
import trustme

from ccm_wsgi import certs
from ccm_wsgi.credentials.pkce import PasteError, Pkce, Refused, authorize_url, read_pasted


def test_pkce_is_s256_of_32_random_bytes() -> None:
    first, second = Pkce.new(), Pkce.new()
    assert len(first.verifier) == 43 and len(first.state) == 43 and first.verifier != second.verifier
    digest = base64.urlsafe_b64encode(hashlib.sha256(first.verifier.encode()).digest()).rstrip(b"=").decode()
    assert first.challenge == digest and "=" not in first.challenge


def test_the_authorize_url_is_claude_codes() -> None:
    pkce = Pkce("v" * 43, "C" * 43, "S" * 43)
    assert authorize_url("https://claude.com/cai/oauth/authorize", "https://platform.claude.com/oauth/code/callback",
                         pkce) == (
        "https://claude.com/cai/oauth/authorize?code=true&client_id=9d1c250a-e61b-44d9-88ed-5944d1962f5e"
        "&response_type=code&redirect_uri=https%3A%2F%2Fplatform.claude.com%2Foauth%2Fcode%2Fcallback"
        "&scope=org%3Acreate_api_key+user%3Aprofile+user%3Ainference+user%3Asessions%3Aclaude_code"
        "+user%3Amcp_servers+user%3Afile_upload&code_challenge=" + "C" * 43
        + "&code_challenge_method=S256&state=" + "S" * 43)
    assert authorize_url("http://x/authorize?tenant=1", "r", pkce).startswith("http://x/authorize?tenant=1&code=true&")


@pytest.mark.parametrize(("pasted", "expected"), [
    ("abc-DEF_123#st.ate~1", ("abc-DEF_123", "st.ate~1")),
    ("  abc123  ", ("abc123", None)),
    ("abc123&state=x", ("abc123", None)),
    ("https://platform.claude.com/oauth/code/callback?code=abc123&state=xyz", ("abc123", "xyz")),
    ("http://localhost:54545/callback?code=abc123&state=xyz", ("abc123", "xyz")),
    ("http://localhost:54545/callback?code=abc123", ("abc123", None)),
])
def test_what_may_be_pasted(pasted: str, expected: tuple[str, str | None]) -> None:
    assert read_pasted(pasted) == expected


@pytest.mark.parametrize("pasted", ["", "not a code", "abc#not a state", "https://x/callback?state=only", "<abc>"])
def test_what_is_not_a_code(pasted: str) -> None:
    with pytest.raises(PasteError):
        read_pasted(pasted)


def test_a_refusal_names_only_an_oauth_error_code() -> None:
    with pytest.raises(Refused, match=r"refused \(access_denied\)"):
        read_pasted("http://localhost:1/callback?error=access_denied&state=x")
    with pytest.raises(Refused, match=r"refused \(an error\)"):
        read_pasted("http://localhost:1/callback?error=<script>&state=x")


def test_certificate_validity_utc_and_generalized_times() -> None:
    ca = trustme.CA()
    not_after = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)
    leaf = ca.issue_cert("127.0.0.1", not_before=dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc),
                         not_after=not_after)
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems).decode()
    assert certs.validity(chain) == (dt.datetime(2024, 1, 2, tzinfo=dt.timezone.utc), not_after)  # UTCTime
    assert certs.validity(ca.cert_pem.bytes().decode())[1].year == 3000  # GeneralizedTime after 2049
    with pytest.raises(certs.CertificateError):
        certs.validity("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(certs.CertificateError):
        certs.validity("no certificate here")
