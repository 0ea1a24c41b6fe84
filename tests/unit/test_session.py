"""A status page session lasts only while its token grants access, under the config as it is now (after a reload:
the user removed, disabled, expired or given another token, the admin token removed), and holds no token."""

from __future__ import annotations

import datetime
import json
import secrets

from flask.sessions import SecureCookieSession

from ccm_wsgi.config import User
from ccm_wsgi.http.auth import Authenticator
from ccm_wsgi.observe.session import form_ok, form_token, sign_in, viewer
from tests.support.constants import ALICE, BOB

ADMIN = "ak-ccm-admin-session-0123456789"
KEY = secrets.token_bytes(32)
NOW = 1_800_000_000.0


def auth(*users: User, admins: tuple[str, ...] = (ADMIN,)) -> Authenticator:
    return Authenticator(users, admins)


ALICE_USER = User(name="alice", token=ALICE)
BOB_USER = User(name="bob", token=BOB)


def signed(token: str, by: Authenticator) -> SecureCookieSession:
    session = SecureCookieSession()
    assert sign_in(by, KEY, session, token, NOW) is not None
    assert session.permanent
    assert token not in json.dumps(dict(session))  # what the cookie carries (signed, not encrypted)
    return session


def test_a_user_session_ends_when_the_config_no_longer_lets_the_user_in() -> None:
    session = signed(ALICE, auth(ALICE_USER, BOB_USER))
    seen = viewer(auth(ALICE_USER, BOB_USER), KEY, session, NOW)
    assert seen is not None and seen.user is not None and seen.user.name == "alice" and not seen.admin
    assert viewer(auth(BOB_USER), KEY, session, NOW) is None  # removed
    assert viewer(auth(User(name="alice", token=ALICE, disabled=True), BOB_USER), KEY, session, NOW) is None
    expired = User(name="alice", token=ALICE, expires=datetime.datetime.fromtimestamp(NOW - 1, datetime.timezone.utc))
    assert viewer(auth(expired, BOB_USER), KEY, session, NOW) is None
    assert viewer(auth(User(name="alice", token="ak-ccm-alice-new-token-0123"), BOB_USER), KEY, session, NOW) is None
    assert viewer(auth(ALICE_USER, BOB_USER), secrets.token_bytes(32), session, NOW) is None  # another run's key
    session["user"] = "bob"  # a session cannot be turned into another user's
    assert viewer(auth(ALICE_USER, BOB_USER), KEY, session, NOW) is None


def test_an_admin_session_ends_when_its_token_is_removed() -> None:
    session = signed(ADMIN, auth(ALICE_USER))
    seen = viewer(auth(ALICE_USER), KEY, session, NOW)
    assert seen is not None and seen.admin and seen.user is None
    assert viewer(auth(ALICE_USER, admins=("ak-ccm-other-admin-012345",)), KEY, session, NOW) is None


def test_who_may_sign_in() -> None:
    by = auth(ALICE_USER, User(name="bob", token=BOB, disabled=True))
    assert sign_in(by, KEY, SecureCookieSession(), "not-a-token", NOW) is None
    assert sign_in(by, KEY, SecureCookieSession(), "", NOW) is None
    assert sign_in(by, KEY, SecureCookieSession(), BOB, NOW) is None  # disabled
    open_service = Authenticator([], ())
    assert viewer(open_service, KEY, SecureCookieSession(), NOW) is not None  # everyone sees an open service


def test_forms_need_the_session_token_and_this_site() -> None:
    session = SecureCookieSession()
    token = form_token(session)
    assert form_token(session) == token
    assert form_ok(session, {}, token)
    assert form_ok(session, {"HTTP_SEC_FETCH_SITE": "same-origin"}, token)
    assert not form_ok(session, {"HTTP_SEC_FETCH_SITE": "cross-site"}, token)
    assert not form_ok(session, {"HTTP_SEC_FETCH_SITE": "same-site"}, token)
    assert not form_ok(session, {}, token + "x")
    assert not form_ok(session, {}, None)
    assert not form_ok(SecureCookieSession(), {}, token)
