"""Launch options of the browser app, checked before anything heavy is imported."""

from __future__ import annotations

from pipelines.errors import ConfigError


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); the password may contain ':'."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: expected user:password")
    return user, password


def check_launch_options(share: bool, auth: str | None) -> tuple[str, str] | None:
    """`--share` publishes the app on a public URL: refused without `--auth user:password`."""
    creds = parse_auth(auth)
    if share and creds is None:
        raise ConfigError("--share makes the app reachable from the internet; it needs --auth user:password "
                          "(e.g. lora-studio ui --share --auth me:a-long-password)")
    return creds
