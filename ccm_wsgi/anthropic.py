"""What Anthropic's side of the wire expects, in one place: URLs, the OAuth client, beta flags, header names.

These are the values the shipped Claude Code CLI uses (2.1.x), so that a request, a refresh or a login
made by ccm-wsgi looks to Anthropic exactly like one made by `claude` itself.
"""

from __future__ import annotations

DEFAULT_UPSTREAM_URL = "https://api.anthropic.com"
DEFAULT_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
DEFAULT_AUTHORIZE_URL = "https://claude.com/cai/oauth/authorize"
REDIRECT_URI = "https://platform.claude.com/oauth/code/callback"  # the hosted page that shows `code#state`

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"  # Claude Code's public OAuth client (PKCE, no secret)
LOGIN_SCOPES = ("org:create_api_key", "user:profile", "user:inference", "user:sessions:claude_code",
                "user:mcp_servers", "user:file_upload")
# The token endpoint is sensitive to the User-Agent: Claude Code refreshes through axios.
TOKEN_USER_AGENT = "axios/1.15.2"
API_USER_AGENT = "claude-cli/2.1.332 (external, cli)"

OAUTH_BETA = "oauth-2025-04-20"  # an OAuth bearer token is only accepted with this beta flag
USAGE_PATH = "/api/oauth/usage"  # the subscription's 5-hour and weekly windows (and its paid extra usage)
PROFILE_PATH = "/api/oauth/profile"  # the account's organisation type and rate-limit tier

RATELIMIT_PREFIX = "anthropic-ratelimit-unified-"
SESSION_HEADER = "x-claude-code-session-id"
