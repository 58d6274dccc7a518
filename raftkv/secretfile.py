"""Secrets (client token, cluster token, Raft secret) from a file or the environment.

A secret given as a command-line value is visible to every local user in `ps` and
/proc/PID/cmdline, so the processes take a file path (`--*-file`) or an environment
variable instead. Both process configurations use `resolve_secret`, so the rules are
the same everywhere: a `--*-file` flag, then the deprecated command-line value, then
the environment (`$VAR_FILE` naming a file, as with Docker secrets, then `$VAR` itself).
An empty value means "not set"; warnings come back as notices for the caller to log
once logging is up.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from typing import Mapping

# Shorter secrets are accepted with a warning: the Raft secret in particular is
# stretched with a fixed salt by PySyncObj, so a short one can be guessed offline
# from captured traffic.
MIN_RECOMMENDED_LENGTH = 16


class SecretError(ValueError):
    """A secret was requested but cannot be used (missing, unreadable or empty file)."""


def read_secret_file(path: str, what: str) -> tuple[str, list[str]]:
    """The file's content without surrounding whitespace (a trailing newline from
    `echo` is not part of the secret), plus warnings about its permissions."""
    notices: list[str] = []
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(64 * 1024 + 1)
    except OSError as exc:
        raise SecretError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    if len(raw) > 64 * 1024:
        raise SecretError(f"the {what} file {path} is larger than 64 KiB; is it the right file?")
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretError(f"the {what} file {path} is not UTF-8 text") from None
    if not value:
        raise SecretError(f"the {what} file {path} is empty")
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        notices.append(f"the {what} file {path} is readable by group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):o}); chmod 600 it")
    return value, notices


def resolve_secret(what: str, *, file: str | None, env: Mapping[str, str], env_var: str,
                   argv_value: str | None = None, argv_flag: str | None = None) -> tuple[str | None, list[str]]:
    """(secret or None, notices). Sources in order: `file`, the deprecated command-line
    value, the file named by `$<env_var>_FILE`, `$<env_var>`. Raises SecretError when a
    given file is unusable."""
    notices: list[str] = []
    if file:
        if argv_value:
            raise SecretError(f"pass the {what} either as {argv_flag} or as a file, not both")
        value, notices = read_secret_file(file, what)
    elif argv_value:
        notices.append(f"{argv_flag} puts the {what} on the command line, where any local user can read it "
                       f"(ps, /proc/PID/cmdline); it still works, but use ${env_var} or {argv_flag}-file instead")
        value = argv_value
    elif env.get(env_var + "_FILE"):
        value, notices = read_secret_file(env[env_var + "_FILE"], what)
    else:
        value = env.get(env_var) or None
        if value is not None:
            value = value.strip() or None
    if value is not None and len(value) < MIN_RECOMMENDED_LENGTH:
        notices.append(f"the {what} is shorter than {MIN_RECOMMENDED_LENGTH} characters; "
                       f"use a long random one (e.g. `openssl rand -hex 32`)")
    return value, notices


def same_secret(given: str | bytes, expected: str | bytes) -> bool:
    """Constant-time comparison that does not leak the expected length either
    (hmac.compare_digest returns early on a length mismatch): compare digests."""
    g = given.encode() if isinstance(given, str) else given
    e = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(hashlib.sha256(g).digest(), hashlib.sha256(e).digest())
