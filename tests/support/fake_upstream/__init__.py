"""A scriptable fake Anthropic API (api.anthropic.com + the OAuth token endpoint) for the ccm-wsgi tests.

Run it as a module from the repository root (`FakeUpstream.start()` does this for you)::

    python -m tests.support.fake_upstream --port 0 [--host 127.0.0.1] [--tls-cert PEM --tls-key PEM]
                                  [--token-expires-in 3600] [--strict-tokens] [--parent-pid PID] [--verbose]

It prints exactly one line ``LISTENING <port>`` on stdout once it accepts connections and serves until SIGTERM or
SIGINT (exit status 0). It is a raw gevent ``StreamServer`` with its own small HTTP/1.1 parser (keep-alive,
Content-Length and chunked request bodies, ``Expect: 100-continue``) because the faults it injects need direct
control of the socket: resets with SO_LINGER 0, stalls, close-delimited bodies, incremental compression.

Upstream endpoints
    POST /v1/messages                JSON or SSE (``"stream": true``), like the Messages API
    POST /v1/messages/count_tokens   ``{"input_tokens": n}``
    GET  /v1/models                  a small model list
    POST /v1/oauth/token, /oauth/token   refresh_token grant with refresh-token rotation; authorization_code
                                     grant of a login (PKCE S256, state, redirect URI and client id checked)
    GET  .../oauth/authorize         a login's authorize page: records it, redirects to its redirect_uri with a
                                     code (config `authorize` changes that, see authorize.py)
    GET  /api/oauth/usage            5h / 7d utilisation (percent) of the caller's account
    GET  /api/oauth/profile          organisation type and rate-limit tier of the caller's account
    anything else                    404 with an Anthropic error body (``/ccm/v1/status`` included)

Per-request knobs for /v1/*: a request header ``x-fake-NAME`` or a query parameter ``fake_NAME`` (``-`` becomes
``_``; the query parameter wins). Unknown names are ignored, a malformed number gives a 400.
    events N                SSE: number of content_block_delta events (default 5); texts "Hello", " 1", " 2", ...
    delay-ms N              SSE: sleep before each delta (the peer closing meanwhile ends the stream)
    ttfb-ms N               sleep before the status line (every /v1 answer)
    delta-bytes N           pad each delta text to N characters
    input-tokens, output-tokens, cache-read-tokens, cache-creation-tokens, cache-5m-tokens, cache-1h-tokens
                            usage numbers (defaults 10; output = events when streaming else 5; cache 0;
                            creation = 5m + 1h, or 5m = creation when the split is not given)
    model NAME              model echoed in the answer instead of the request's
    status CODE             answer CODE with an Anthropic error body; 429/503/529 add retry-after
    retry-after S           retry-after value for status (default 30)
    drop-after N            SSE: TCP reset (SO_LINGER 0) after N deltas, chunked body unterminated;
                            JSON: 0 = reset before the status line, else after the headers and half the body
    stall-after N           like drop-after but go silent and keep the socket open (120 s or until the peer closes)
    stall-before-headers 1  read the request, never answer (120 s or until the peer closes)
    error-after N           SSE: after N deltas send ``event: error`` (overloaded_error) and end the body cleanly
    framing F               chunked (SSE default) | close (no length, body ends at close) | length (JSON default;
                            for SSE: the whole stream at once with a Content-Length, no delays or faults)
    encoding E              gzip | br | zstd | deflate, only if Accept-Encoding allows it; SSE is compressed
                            incrementally with a flush per event
    bytes N                 JSON: pad the text so the body is about N bytes
    invalid-json 1          200 application/json with a truncated body
    ratelimit JSON          extra/override response headers, e.g. '{"anthropic-ratelimit-unified-5h-reset": "x"}'
                            (a null value removes a header)
    wait-release KEY        SSE: send message_start, content_block_start, ping and the first delta, then block until
                            POST /_fake/release/KEY; JSON (a body over 256 KiB): block after its first 256 KiB.
                            Nobody releasing it within release-timeout-ms (default 10000) fails the answer with a
                            reset, never lets it go on. GET /_fake/sent/KEY reports progress

Rate-limit headers on every /v1 answer come from the account (``anthropic-ratelimit-unified-status``, ``-5h-status``,
``-5h-utilization``, ``-5h-reset``, ``-7d-status``, ``-7d-utilization``, ``-7d-reset``, ``-representative-claim``,
``-reset``), plus ``request-id: req_fake_<seq>`` and ``x-fake-account: <account id>``.

Accounts: every access token belongs to an account (id given at creation, default: the first access token).
Refreshing issues a new access token for the same account, so the account's scripted rate-limit state survives.
Unknown bearer tokens are auto-registered as their own account unless strict mode is on.
As Anthropic does, a bearer (OAuth) token on /v1/* or /api/oauth/usage without ``anthropic-beta: oauth-2025-04-20``
gets a 401 authentication_error ("OAuth authentication is currently not supported."), in every mode.

Config `date_skew` (seconds) shifts the `Date` header of every answer, like an upstream whose clock is off.
An account's `extra_usage` is the usage API's `extra_usage` object (default: paid extra usage off).

Faults of the token endpoint and the usage API (``/_fake/config`` token_endpoint / usage_api, or an account's
usage_api): delay_ms, hold KEY (wait for POST /_fake/release/KEY, reset after 30 s), down (close), reset (RST),
status with retry_after and body; times N uses the fault N times.

Control API (never recorded or counted, never rate-limited)
    GET  /_fake/health                       "ok"
    GET  /_fake/stats                        counters and gauges
    GET  /_fake/requests[?path=P&since=SEQ]  recorded upstream requests
    POST /_fake/reset                        clear records and counters (body {"accounts": true, "config": true}
                                             also drops accounts/tokens and restores the start-up config)
    GET|POST /_fake/config                   strict, token_expires_in, token_endpoint fault, usage_api fault,
                                             authorize, date_skew
    GET  /_fake/authorizations[/<state>]     the logins the authorize page saw (challenge, redirect URI, code...)
    POST /_fake/authorizations/<state>       {"expired": true}: that login's code has expired
    GET|POST /_fake/accounts                 list / create (or extend) an account
    GET|POST /_fake/accounts/<ref>/state     read / script an account (ref = account id, access or refresh token)
    POST /_fake/revoke                       {"access_token": T} and/or {"refresh_token": R}
    POST /_fake/release/<key>                let a stream waiting on ``x-fake-wait-release: key`` continue
    GET  /_fake/sent/<key>                   {"events", "deltas", "bytes", "waiting", "released", "done",
                                             "timed_out"} of that stream (or held token request)

Stats (GET /_fake/stats): requests_total, requests_by_path, responses_by_status, messages_by_account, unauthorized,
oauth_beta_missing, refreshes, refreshes_by_account, invalid_grant, authorizations, logins, token_requests (client_id,
scope, grant_type, refresh_token, content_type, status), usage_api_calls / profile_api_calls (by account),
connections_total, streams_total, streams_completed, dropped, closed_early (answers the client abandoned: a failed
send, or the peer closing during a delay, ttfb, stall or stall-before-headers), and the live gauges open_connections
(client sockets, control connections excluded), open_connections_all, active_streams, active_requests. Reset clears
all but the gauges.

``FakeUpstream`` (harness.py) starts it as a subprocess for tests; importing this package does not monkey-patch
anything (only running it with ``python -m`` does). The modules, by concern:

    common.py    limits, Anthropic vocabulary, shared exceptions
    wire.py      the small HTTP/1.1 layer: parsing, one connection and its raw faults, framing, one exchange
    encoding.py  response compression and Accept-Encoding
    state.py     config, accounts and tokens, counters, records, release keys
    plan.py      the per-request knobs and the SSE event sequence
    messages.py  the /v1 endpoints
    oauth.py     the token endpoint, the usage and profile APIs, scripted faults
    authorize.py the authorize page and the authorization_code grant of a login
    control.py   the /_fake/ control API
    server.py    the gevent server, routing, the command line
    harness.py   FakeUpstream: start, control and stop it from a test
"""

from .harness import FakeUpstream

__all__ = ["FakeUpstream"]
