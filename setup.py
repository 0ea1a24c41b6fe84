from setuptools import find_packages, setup

setup(
    name="ccm-wsgi",
    version="0.1.0",
    description="Claude Code Multiplexer: share a Claude subscription with a small team over HTTP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ccm_wsgi", "ccm_wsgi.*"]),
    package_data={"ccm_wsgi.accounting": ["pricing.json"],
                  "ccm_wsgi.observe": ["templates/ccm/*.html", "static/*.css", "static/*.js"]},
    python_requires=">=3.10",
    install_requires=[
        "gevent>=24.2",
        "flask>=3.0",
        "urllib3>=2.2",
        "keyring>=25.0",
        "click>=8.1",
        "pysocks>=1.7.1",
        "brotli>=1.1",
        "zstandard>=0.22",
        "pydantic>=2.7",
        "segno>=1.5",  # the QR code of the login URL in a terminal; pure Python, no dependencies
        "orjson>=3.9",  # reads every response's usage: four times the standard parser's speed
        "prometheus-client>=0.20",  # /metrics, with gunicorn's workers summed (multiprocess mode)
        "redis[hiredis]>=5.0",  # shared state of several nodes (`state`); cooperative under gevent (hiredis: its C
        # reply parser, a few µs less per command)
    ],
    extras_require={
        "gunicorn": ["gunicorn[gevent]>=23.0"],
        "test": [
            "gunicorn[gevent]>=23.0",
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "anthropic>=0.40",
            "trustme>=1.1",
            "ruff>=0.6",
            "mypy>=1.10",
            "types-gevent",
            "types-pysocks",
            "selenium>=4.20",  # drives Debian's chromium (and its chromedriver) for the status page tests
        ],
    },
    entry_points={"console_scripts": ["ccm-wsgi=ccm_wsgi.cli:main"]},
)
