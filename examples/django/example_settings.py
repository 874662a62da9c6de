"""Just enough settings to run examples/django/relaytokens (`include("relaytokens.urls")` in a
project of your own instead; add RELAY_SECRET_FILE and RELAY_URL to its settings)."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "relaytokens",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "relaytokens.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("DJANGO_DATABASE", ":memory:")}}
USE_TZ = True
LOGIN_URL = "/login/"

# The application's own copy of the relay's secret, and where browsers reach the relay.
RELAY_SECRET_FILE = os.environ.get("RELAY_SECRET_FILE", "/etc/myapp/relay-secret")
RELAY_URL = os.environ.get("RELAY_URL", "wss://example.com/relay/ws")
