"""ccm-wsgi: a Claude Code Multiplexer (sing-box `ccm` service) on gevent, Flask and urllib3."""

__version__ = "0.1.0"
