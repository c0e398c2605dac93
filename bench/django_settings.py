"""The Django settings every benchmark app shares: DEBUG off, startproject's middleware, no access log."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # django_tornado.py

STARTPROJECT_MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
CONTRIB_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions", "django.contrib.messages"]


def configure(urlconf: str, **overrides: object) -> None:
    """Configure Django for the app whose urlconf is ``urlconf`` (once), with ``overrides`` on top."""
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(**{
        "DEBUG": False,
        "SECRET_KEY": "benchmark-only",
        "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
        "ROOT_URLCONF": urlconf,
        "INSTALLED_APPS": CONTRIB_APPS,
        "MIDDLEWARE": STARTPROJECT_MIDDLEWARE,
        "DATABASES": {},
        "SESSION_ENGINE": "django.contrib.sessions.backends.signed_cookies",
        # No access log from any server: its cost would measure the terminal.
        "LOGGING": {"version": 1, "disable_existing_loggers": False, "loggers": {"django.server": {"level": "WARNING"}}},
        **overrides,
    })
